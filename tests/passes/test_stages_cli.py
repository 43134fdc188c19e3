"""`podplan trace MODEL --stages [--json]` and `--dump-after PASS`."""

from __future__ import annotations

import json

from planner.cli.main import main
from tests.conftest import assert_one_line_error, run_cli


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_stages_json_is_complete_and_deterministic(capsys):
    code, first, _ = _run(capsys, "trace", "tiny-deepseek-v3", "--stages", "--json", "--seq", "6")
    assert code == 0
    _, second, _ = _run(capsys, "trace", "tiny-deepseek-v3", "--stages", "--json", "--seq", "6")
    assert first == second
    doc = json.loads(first)
    assert doc["stage_counts"] == {"embed": 1, "attention": 3, "moe_gate": 2, "dense_ffn": 1,
                                   "routed_experts": 2, "shared_experts": 2, "head": 1}
    assert [r["stage"] for r in doc["stages"]][:4] == ["embed", "layer0_attention", "layer0_dense_ffn", "layer1_attention"]
    row = next(r for r in doc["stages"] if r["stage"] == "layer1_routed_experts")
    assert row["layer"] == 1 and row["kind"] == "routed_experts" and row["params"] > 0
    assert set(row["cut_in"]) == {"hidden", "routing_ids", "routing_weights"}
    assert doc["microbatch_schedule"].startswith("0:emb+a0 | 1:emb+a0,0:f0")
    assert [p["phase"] for p in doc["phases"]] == ["prefill", "decode"]
    assert any(c["kind"] == "expert_out" and c["fanout"] == 2 for c in doc["cuts"])


def test_stages_table(capsys):
    code, out, err = _run(capsys, "trace", "tiny-mixtral", "--stages")
    assert code == 0
    assert "8 stages" in out and "routed_experts" in out and "cut in B/token" in out
    assert "microbatch schedule (2 microbatches" in out and "passes, s: kv-cache" in err


def test_dump_after_prints_the_graph(capsys):
    code, out, _ = _run(capsys, "trace", "tiny-olmoe", "--dump-after", "classify", "--seq", "4")
    assert code == 0
    assert out.startswith("// after pass 'classify'") and "stage=layer0_attention" in out
    assert "┏" not in out  # no table without --stages


def test_bad_stage_flags_are_one_line_exit_2(capsys):
    code, _, err = _run(capsys, "trace", "tiny-olmoe", "--dump-after", "splt")
    assert code == 2 and err.strip() == (
        "podplan trace: error: unknown pass 'splt'; known: kv-cache, annotate, classify, split, cut-analysis, "
        "expert-decompose, phases, microbatch"
    )
    code, _, err = _run(capsys, "trace", "tiny-olmoe", "--dump-after", "split", "--json")
    assert code == 2 and "--dump-after prints a graph, not JSON" in err
    assert_one_line_error(run_cli("trace", "tiny-olmoe", "--stages", "--seq", "0"), "--batch and --seq must be positive")
