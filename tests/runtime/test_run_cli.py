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


@pytest.fixture(scope="module")
def gpu_host_plan(tmp_path_factory):
    """A plan compiled for one H200 of this host (an aggregated instance: prefill and decode on it)."""
    path = tmp_path_factory.mktemp("h200") / "tiny.h200-1.json"
    proc = run_cli("compile", "tiny-qwen3-moe", "--topology", "h200:1", "--quant", "bf16", "-o", str(path))
    assert proc.returncode == 0, proc.stderr
    return path


def test_a_gpu_host_plan_runs_on_nccl_or_is_refused_in_one_line(gpu_host_plan, tmp_path):
    import torch

    plan = load_plan(gpu_host_plan)
    spec = spec_from_plan(plan)
    assert spec.backend == "nccl" and spec.static  # chosen by the topology, static buffers for CUDA graphs
    assert spec_from_plan(plan, graphs=False).static is False
    if not torch.cuda.is_available():
        assert_one_line_error(run_cli("run", str(gpu_host_plan)), "needs 1 CUDA GPUs", "compile for local:1")
        return
    proc = run_cli("run", str(gpu_host_plan), "--prompts", "4", "--prompt-len", "6", "--new-tokens", "6", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["check"]["ok"] and doc["measured"]["tpot_basis"].endswith("CUDA-graph replays")
    assert doc["predictions"]["decode"]["tpot_ms"] > 0 and doc["measured"]["stage_ms"]["attention"] > 0


def test_predictions_are_for_the_run_not_the_plans_design_batch(gpu_host_plan):
    from planner.run_predictions import run_predictions

    plan = load_plan(gpu_host_plan)
    small = run_predictions(plan, prompts=2, prompt_len=16, new_tokens=4)
    big = run_predictions(plan, prompts=64, prompt_len=16, new_tokens=4)
    assert small["decode"]["batch_per_device"] == 2 and big["decode"]["batch_per_device"] == 64
    assert small["decode"]["tpot_ms"] < big["decode"]["tpot_ms"]  # more sequences per step take longer
    assert small["prefill"]["ttft_ms"] < big["prefill"]["ttft_ms"]
    assert small["quant"] == "bf16"  # the runtime's seeded weights, whatever the plan was compiled for


def test_the_measured_table_puts_errors_beside_predictions():
    doc = {"model": "m", "world_size": 1, "backend": "nccl", "prompts": 4, "prompt_len": 8, "new_tokens": 4,
           "measured": {"tokens_per_s": 10.0, "tokens_per_s_per_device": 10.0, "prefill_ms": 12.0, "tpot_ms": 5.0,
                        "decode_tokens_per_s": 800.0, "bytes_per_token": 0.0, "tpot_basis": "2 CUDA-graph replays",
                        "stage_ms": {"attention": 1.5, "routed_experts": 3.0, "head": 0.2}},
           "predictions": {"decode": {"tpot_ms": 4.0, "throughput_per_device": 1000.0,
                                      "breakdown": {"attention": 1.0, "experts": 3.0, "lm_head": 0.0}},
                           "prefill": {"ttft_ms": 10.0}}, "ranks": []}
    from runtime.metrics import comparison_rows, stage_rows

    rows = {r[0]: r for r in comparison_rows(doc)}
    assert rows["TPOT / decode step (ms)"][3] == "+25%" and rows["TTFT / prefill step (ms)"][3] == "+20%"
    assert rows["decode tokens/s per device"][3] == "-20%"
    stages = {r[0]: r for r in stage_rows(doc)}
    assert stages["attention"][3] == "+50%" and stages["experts"][3] == "+0%"
    assert stages["lm_head"][1] == "0.2" and stages["lm_head"][3] == "-"  # predicted 0: no error to show
