"""`podplan trace` / `podplan models` from the command line, including every bad input."""

from __future__ import annotations

import json

import pytest

from tests.conftest import assert_one_line_error, run_cli


def test_trace_deepseek_v3_json():
    proc = run_cli("trace", "deepseek-v3", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["model"] == "deepseek-v3"
    assert (doc["num_layers"], doc["num_moe_layers"]) == (61, 58)
    assert (doc["num_routed_experts"], doc["num_shared_experts"], doc["top_k"]) == (256, 1, 8)
    assert round(doc["params_total"] / 1e9) == 671 and round(doc["params_active"] / 1e9) in (37, 38)
    assert len(doc["layers"]) == 61
    moe = doc["layers"][3]
    assert moe["kind"] == "moe" and "routed_experts" in moe["roles"]
    assert moe["a2e_bytes_per_token"] > 8 * 7168 * 2 and moe["e2a_bytes_per_token"] == 8 * 7168 * 2
    assert doc["layers"][0]["kind"] == "dense" and doc["layers"][0]["a2e_bytes_per_token"] == 0


def test_trace_table_and_models_listing():
    proc = run_cli("trace", "tiny-deepseek-v3")
    assert proc.returncode == 0, proc.stderr
    assert "tiny-deepseek-v3" in proc.stdout and "routed_experts" in proc.stdout
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
            ["dense model", "Mixture-of-Experts"],
        ),
    ],
    ids=["unknown-name", "malformed", "unreadable", "missing-field", "topk>experts", "unsupported-arch",
         "negative", "not-object", "unknown-arch-class", "unbuildable", "dense"],
)
def test_bad_model_input_is_one_line_exit_2(tmp_path, make, fragments):
    assert_one_line_error(run_cli("trace", make(tmp_path)), *fragments)


def test_bad_flags_are_one_line_exit_2():
    assert_one_line_error(run_cli("trace", "tiny-mixtral", "--batch", "0"), "--batch")
    assert_one_line_error(run_cli("trace", "tiny-mixtral", "--bogus"), "unrecognized arguments")
    assert_one_line_error(run_cli("trace", "tiny-mixtral", "--seq", "x"), "invalid int value")
