"""`podplan trace` / `podplan models` from the command line, including every bad input."""

from __future__ import annotations

import json

import pytest

from passes import PIPELINES
from tests.conftest import assert_one_line_error, cli_in_process, run_cli


def test_trace_deepseek_v3_json():
    proc = run_cli("trace", "deepseek-v3", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["model"] == "deepseek-v3"
    assert (doc["num_layers"], doc["num_moe_layers"]) == (61, 58)
    assert (doc["num_routed_experts"], doc["num_shared_experts"], doc["top_k"]) == (256, 1, 8)
    assert round(doc["params_total"] / 1e9) == 671 and round(doc["params_active"] / 1e9) in (37, 38)
    assert doc["passes"] == list(PIPELINES["stage-split"])  # the rows come from the stage-split pipeline
    assert len(doc["layers"]) == 61
    moe = doc["layers"][3]
    assert moe["kind"] == "moe" and moe["stages"] == ["attention", "moe_gate", "routed_experts", "shared_experts"]
    # measured by cut-analysis: top-8 copies of the 7168-wide BF16 hidden state plus an int32 expert id
    # and an fp32 weight each go in; 8 expert outputs come back
    assert moe["dispatch_bytes_per_token"] == 8 * (7168 * 2 + 4 + 4)
    assert moe["combine_bytes_per_token"] == 8 * 7168 * 2
    # the attention stage feeds the router, the 8 expert copies and the shared expert
    assert moe["attention_to_ffn_bytes_per_token"] == (1 + 8 + 1) * 7168 * 2
    assert moe["ffn_to_next_bytes_per_token"] == (8 + 1) * 7168 * 2
    # INT8: one byte per element plus one fp32 scale per token and copy
    assert moe["attention_to_ffn_bytes_per_token_int8"] == (1 + 8 + 1) * (7168 + 4)
    dense = doc["layers"][0]
    assert dense["kind"] == "dense" and dense["stages"] == ["attention", "dense_ffn"]
    assert dense["dispatch_bytes_per_token"] == 0 and dense["attention_to_ffn_bytes_per_token"] == 7168 * 2


def test_trace_json_is_the_stage_table_summed_per_layer():
    per_layer = run_cli("trace", "tiny-deepseek-v3", "--json")
    staged = cli_in_process("trace", "tiny-deepseek-v3", "--stages", "--json")
    assert per_layer.returncode == 0 and staged.returncode == 0, per_layer.stderr + staged.stderr
    assert run_cli("trace", "tiny-deepseek-v3", "--json").stdout == per_layer.stdout  # deterministic
    layers, stages = json.loads(per_layer.stdout)["layers"], json.loads(staged.stdout)["stages"]
    for row in layers:
        own = [s for s in stages if s["layer"] == row["layer"]]
        assert row["stages"] == [s["kind"] for s in own]
        assert row["params"] == sum(s["params"] for s in own)
        assert row["flops_per_token"] == round(sum(s["flops_per_token"] for s in own), 1)
        routed = [s for s in own if s["kind"] == "routed_experts"]
        if routed:
            assert row["dispatch_bytes_per_token"] == routed[0]["cut_in_bytes_per_token"]
            assert row["combine_bytes_per_token"] == routed[0]["cut_out_bytes_per_token"]


def test_trace_table_and_models_listing():
    proc = run_cli("trace", "tiny-deepseek-v3")
    assert proc.returncode == 0, proc.stderr
    assert "tiny-deepseek-v3" in proc.stdout and "routed_experts" in proc.stdout and "dispatch B/token" in proc.stdout
    models = run_cli("models", "--json")
    assert models.returncode == 0, models.stderr
    rows = {r["name"]: r for r in json.loads(models.stdout)}
    assert {"deepseek-v3", "qwen3-235b-a22b", "qwen3-30b-a3b", "mixtral-8x7b", "mixtral-8x22b", "olmoe-1b-7b"} <= set(rows)
    assert all(name.replace("tiny-", "") for name in rows)
    tiny = [r for n, r in rows.items() if n.startswith("tiny-")]
    assert len(tiny) == 4 and all(r["hidden"] <= 128 and r["num_routed_experts"] == 8 for r in tiny)
    assert rows["mixtral-8x7b"]["top_k"] == 2 and rows["deepseek-v3"]["num_shared_experts"] == 1


def _write(tmp_path, cfg, name="config.json"):
    path = tmp_path / name
    path.write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    return str(path)


TINY = {"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "num_local_experts": 8,
        "num_experts_per_tok": 2}


@pytest.mark.parametrize(
    "make,fragments",
    [
        (lambda p: "no-such-model", ["unknown model 'no-such-model'", "deepseek-v3"]),
        (lambda p: _write(p, "{not json"), ["malformed JSON", "line 1"]),
        (lambda p: str(p / "missing" / "config.json"), ["unknown model"]),
        (lambda p: _write(p, {k: v for k, v in TINY.items() if k != "hidden_size"}), ["no 'hidden_size'"]),
        (lambda p: _write(p, dict(TINY, num_experts_per_tok=9)), ["num_experts_per_tok=9", "8 routed experts"]),
        (lambda p: _write(p, dict(TINY, model_type="not_a_model")), ["unsupported architecture 'not_a_model'"]),
        (lambda p: _write(p, dict(TINY, hidden_size=-4)), ["'hidden_size' must be a positive integer"]),
        (lambda p: _write(p, [1, 2]), ["must hold a JSON object"]),
        (lambda p: _write(p, dict(TINY, model_type="not_a_model", architectures=["NotAClass"])),
         ["unsupported architecture 'not_a_model'"]),
        # accepted by the config class, refused by the module constructors: still one line
        (lambda p: _write(p, dict(TINY, pad_token_id=999)), ["cannot build a causal LM for 'mixtral'",
                                                              "Padding_idx", "model card"]),
        (
            lambda p: _write(p, {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                 "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 256}),
            ["LlamaForCausalLM: dense model", "Mixture-of-Experts"],
        ),
    ],
    ids=["unknown-name", "malformed", "unreadable", "missing-field", "topk>experts", "unsupported-arch",
         "negative", "not-object", "unknown-arch-class", "unbuildable", "dense"],
)
def test_bad_model_input_is_one_line_exit_2(tmp_path, make, fragments):
    proc = cli_in_process("trace", make(tmp_path))  # one interpreter for all: a subprocess each cost ~3 s
    assert_one_line_error(proc, *fragments)
    assert "CausalLMRoot" not in proc.stderr  # the frontend's wrapper is not the user's model


def test_bad_flags_are_one_line_exit_2():
    assert_one_line_error(run_cli("trace", "tiny-mixtral", "--batch", "0"), "--batch")
    assert_one_line_error(run_cli("trace", "tiny-mixtral", "--bogus"), "unrecognized arguments")
    assert_one_line_error(run_cli("trace", "tiny-mixtral", "--seq", "x"), "invalid int value")
