"""`podplan run`: a plan end to end through the CLI, the metrics document, and bad input -> one line, exit 2."""

from __future__ import annotations

import dataclasses
import io
import json
import os

import pytest
from rich.console import Console

from planner.ir.plan import load_plan, write_plan
from tests.plan_factory import synthetic_plan, tiny_plan
from runtime.errors import SpecError
from runtime.from_plan import spec_from_plan
from runtime.launch import launch, validate
from runtime.metrics import render, summarise
from runtime.reference import check
from tests.conftest import assert_one_line_error, run_cli
from tests.runtime.conftest import colocated


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("plans") / "tiny.json"
    write_plan(tiny_plan("tiny-deepseek-v3", decode_mode="disaggregated", microbatches=2, weighted=True), path)
    return path


@pytest.mark.slow
def test_cli_runs_a_plan_and_checks_it(plan_file):
    proc = run_cli("run", str(plan_file), "--prompts", "4", "--prompt-len", "4", "--new-tokens", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["check"]["ok"] and doc["check"]["tokens_match"] and doc["check"]["max_abs_diff"] <= 1e-4
    assert doc["world_size"] == 8 and len(doc["ranks"]) == 8
    assert doc["measured"]["tokens_per_s"] > 0 and doc["measured"]["bytes_sent"] > 0
    roles = {r["rank"]: r["role"] for r in doc["ranks"]}
    assert roles[0] == "both" and roles[2] == "attention" and roles[7] == "experts"
    # a local:N plan's times come from nominal CPU figures: they are withheld with a note, bytes compare
    assert "tpot_ms" not in doc["predictions"]["decode"] and "nominal" in doc["predictions"]["timing_note"]
    assert doc["predictions"]["cut_bytes_per_token"] > 0


@pytest.mark.slow
def test_tables_put_measurements_beside_predictions(plan_file):
    spec = spec_from_plan(load_plan(plan_file), prompts=3, prompt_len=3, new_tokens=2)
    out = launch(spec)
    doc = summarise(spec, out.metrics, out.wall_s, check(spec, out.tokens, out.logits))
    buf = io.StringIO()
    render(doc, Console(file=buf, width=200))
    text = buf.getvalue()
    assert "plan predicts" in text and "TPOT / decode step (ms)" in text and "bytes sent" in text
    assert "check against the monolithic transformers model: OK" in text
    assert doc["measured"]["tpot_ms"] > 0 and doc["measured"]["prefill_ms"] > 0


def test_cli_refuses_a_topology_that_cannot_run_here(tmp_path):
    path = tmp_path / "gpu.json"
    write_plan(synthetic_plan("tiny-mixtral", "h100-cluster:1"), path)
    proc = run_cli("run", str(path))
    assert_one_line_error(proc, "plan.topology: 'h100-cluster:1' cannot run on this host", "local:N")


def test_cli_refuses_more_ranks_than_the_host_runs(plan_file, monkeypatch):
    monkeypatch.setenv("PODPLAN_MAX_RANKS", "4")
    proc = run_cli("run", str(plan_file))
    assert_one_line_error(proc, "the plan needs 8 processes; this host runs at most 4")


def _edit(plan, **changes):
    return dataclasses.replace(plan, **changes)


def test_bad_specs_fail_before_any_process_starts(plan_file, tmp_path):
    plan = load_plan(plan_file)
    cases = {
        "config of 'tiny-deepseek-v3'": lambda: spec_from_plan(
            _edit(plan, model=dataclasses.replace(plan.model, config_sha256="0" * 64))),
        "attention_tp: 3": lambda: spec_from_plan(_edit(plan, decode=dataclasses.replace(plan.decode, instances=(
            dataclasses.replace(plan.decode.instances[0], attention_tp=3, attention_dp=1),)))),
        "--prompts must be >= 1": lambda: validate(spec_from_plan(plan, prompts=0)),
        "exceed tiny-deepseek-v3's 512 positions": lambda: validate(spec_from_plan(plan, new_tokens=600)),
        "cannot read safetensors weights": lambda: validate(spec_from_plan(plan, weights=str(tmp_path / "none"))),
        "covers layers [0, 1], tiny-deepseek-v3 has MoE layers [1, 2]": lambda: validate(dataclasses.replace(colocated("tiny-mixtral", 2),
                                                                     model="tiny-deepseek-v3")),
    }
    if not __import__("torch").cuda.is_available():
        cases["the run needs 8 CUDA GPUs"] = lambda: validate(spec_from_plan(plan, backend="nccl"))
    for fragment, make in cases.items():
        with pytest.raises(Exception) as info:
            make()
        assert isinstance(info.value, SpecError) or type(info.value).__name__ == "PlanValidationError", info.value
        assert fragment in str(info.value), (fragment, str(info.value))
        assert "\n" not in str(info.value)


def test_expert_without_a_slot_is_refused():
    spec = colocated("tiny-qwen3-moe", 2)
    inst = spec.instances[0]
    bad = dataclasses.replace(inst.layers[0], phy2log=(0,) * len(inst.layers[0].phy2log))
    spec = dataclasses.replace(spec, instances=(dataclasses.replace(inst, layers=(bad,) + inst.layers[1:]),))
    with pytest.raises(SpecError, match="layer 0: expert 1 has no slot"):
        validate(spec)


def test_missing_plan_file_is_one_line(tmp_path):
    proc = run_cli("run", str(tmp_path / "nope.json"))
    assert_one_line_error(proc, "no such plan file")
    assert not os.listdir(tmp_path)
