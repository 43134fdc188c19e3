"""`podplan compile`: golden plan content, determinism, pins, and bad input (reproduction: test_golden.py)."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch.fx as fx

from passes import PASSES, PIPELINES, PassInfo, meta
from passes.context import PassContext
from passes.graphs import copy_module
from planner.compile import CompileOptions, compile_plan
from planner.golden import GOLDEN, PLANS_DIR
from planner.ir.plan import from_json, load_plan
from tests.conftest import assert_one_line_error, cli_in_process, run_cli


def test_golden_deepseek_plan_content():
    plan = load_plan(PLANS_DIR / "deepseek-v3.cloudmatrix384.json")
    assert plan.model.num_layers == 61 and len(plan.model.moe_layers) == 58
    assert plan.topology.num_devices == 384 and plan.topology.dies_per_device == 2
    used = plan.prefill.devices + plan.decode.devices
    assert len(used) == len(set(used)) <= 384  # no device in two instances
    assert plan.decode.predictions.tpot_ms <= 50.0
    for phase in (plan.prefill, plan.decode):
        for layer in phase.experts[0].layers:
            assert set(layer.phy2log) == set(range(256))  # every expert served in every layer
        inst = phase.instances[0]
        # instances sit on whole servers of 8 NPUs
        assert len(inst.devices) % 8 == 0 and inst.devices[0] % 8 == 0
    assert any(p.chosen for p in plan.frontier)


def test_compile_cli_writes_plan_and_summary(tmp_path):
    out = tmp_path / "tiny.json"
    proc = run_cli("compile", "tiny-mixtral", "--topology", "local:8", "--decode-devices", "4", "--prefill-devices", "2",
                   "--tpot-ms", "1000", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "decode: 1 colocated instance x 4 devices (EP" in proc.stdout
    # short lines under the header (which holds the path): a terminal never breaks one mid-phrase
    lines = proc.stdout.splitlines()
    tables = [i for i, line in enumerate(lines) if line.strip() == "best of each mode"]
    summary = lines[1:tables[0]] if tables else lines[1:]
    assert summary and max(len(line) for line in summary) < 100  # the tables after it are tables
    assert "hardware figures: spec sheet" in proc.stdout  # measured profile, derived or spec sheet: said
    plan = json.loads(out.read_text())
    assert plan["schema_version"] >= 1 and plan["model"]["name"] == "tiny-mixtral"
    again = tmp_path / "again.json"
    assert run_cli("compile", "tiny-mixtral", "--topology", "local:8", "--decode-devices", "4", "--prefill-devices", "2",
                   "--tpot-ms", "1000", "-o", str(again)).returncode == 0
    assert again.read_bytes() == out.read_bytes()


def test_cloudmatrix_infer_layout_can_be_pinned(tmp_path):
    out = tmp_path / "cmi.json"
    proc = run_cli("compile", "deepseek-v3", "--topology", "cloudmatrix384", "--mtp-accept", "0.7",
                   "--decode-devices", "160", "--prefill-devices", "16", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    plan = load_plan(out)
    inst = plan.decode.instances[0]
    assert inst.ep == 320 and len(inst.devices) == 160
    assert len(inst.expert_devices) == 144 and len(inst.shared_expert_devices) == 16  # 288 + 32 dies (CMI)
    # the summary and `podplan show` count the same shared-expert devices
    assert "decode: 1 colocated instance x 160 devices (EP320; shared experts on 16 devices)" in proc.stdout
    from planner.views.text import devices_line

    assert "16 of 160 decode devices" in devices_line(plan) and "shared 0" not in devices_line(plan)
    assert plan.decode.experts[0].slots_per_device == 2
    assert all(len(i.devices) == 16 and i.ep == 32 for i in plan.prefill.instances)


@pytest.mark.parametrize(
    "args,fragments",
    [
        (["no-such-model", "--topology", "local:8"], ["unknown model"]),
        (["tiny-mixtral", "--topology", "mars:3"], ["mars:3", "cloudmatrix384"]),
        (["tiny-mixtral", "--topology", "local:8", "--tpot-ms", "-1"], ["--tpot-ms"]),
        (["tiny-mixtral", "--topology", "local:8", "--time-limit", "-1"], ["--time-limit"]),
        (["tiny-mixtral", "--topology", "local:8", "--loads", "zipf:nope"], ["zipf:nope"]),
        (["tiny-mixtral", "--topology", "local:8", "--attention-devices", "2"], ["--moe-devices"]),
        (["deepseek-v3", "--topology", "local:2", "--quant", "bf16"], ["deepseek-v3 on local:2"]),
        (["tiny-mixtral", "--topology", "cloudmatrix384", "--quant", "fp8"], ["--quant fp8", "Ascend 910C"]),
    ],
    ids=["model", "topology", "tpot", "time-limit", "loads", "afd-pin", "infeasible-memory", "fp8-on-ascend"],
)
def test_compile_bad_input_is_one_line_and_no_file(tmp_path, args, fragments):
    out = tmp_path / "plan.json"
    assert_one_line_error(cli_in_process("compile", *args, "-o", str(out)), *fragments)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_compile_bad_input_from_a_shell(tmp_path):
    """The same refusal from a real process: exit status 2 and one line (the cases above run in-process)."""
    out = tmp_path / "plan.json"
    assert_one_line_error(run_cli("compile", "tiny-mixtral", "--topology", "mars:3", "-o", str(out)), "mars:3")
    assert not out.exists()


# --- the pass pipeline is the compiler ------------------------------------------------------------


def _halve_dispatch(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Toy: the hidden state travels to the routed experts at half its bytes (as an FP8 dispatch would)."""
    out = copy_module(gm)
    out.meta[meta.CUTS] = tuple(
        replace(c, bytes_bf16=c.bytes_bf16 / 2) if c.kind == "hidden" and c.dst.endswith("_routed_experts") else c
        for c in meta.graph_meta(gm, meta.CUTS)
    )
    return out


def test_a_pass_added_to_the_pipeline_changes_the_compiled_plan(monkeypatch):
    """compile_plan runs the registered stage-split pipeline: a pass registered and inserted after
    cut-analysis changes Plan.stages and is named in the provenance; the search does not move."""
    golden = next(g for g in GOLDEN if g.model == "tiny-deepseek-v3")
    before = load_plan(PLANS_DIR / golden.file)
    pipeline = PIPELINES["stage-split"]
    assert before.provenance.passes == pipeline  # what the golden plan was built by
    at = pipeline.index("cut-analysis") + 1
    monkeypatch.setitem(PASSES, "halve-dispatch", PassInfo("halve-dispatch", _halve_dispatch, (meta.CUTS,),
                                                           (meta.CUTS,), "toy"))
    monkeypatch.setitem(PIPELINES, "stage-split", (*pipeline[:at], "halve-dispatch", *pipeline[at:]))

    after = compile_plan(golden.model, golden.topology, golden.options)

    assert after.provenance.passes == (*pipeline[:at], "halve-dispatch", *pipeline[at:])
    old = {st.name: st for st in before.stages}
    changed = {st.name for st in after.stages if st != old[st.name]}
    assert changed == {f"layer{i}_{k}" for i in (1, 2) for k in ("attention", "routed_experts")}
    for layer in (1, 2):
        routed, prev = {st.name: st for st in after.stages}[f"layer{layer}_routed_experts"], old[f"layer{layer}_routed_experts"]
        hidden = 2 * 64 * 2  # top-2 copies of the 64-wide BF16 hidden state, now halved
        assert routed.bytes_in_per_token == prev.bytes_in_per_token - hidden / 2
        attention = {st.name: st for st in after.stages}[f"layer{layer}_attention"]
        assert attention.bytes_out_per_token == old[f"layer{layer}_attention"].bytes_out_per_token - hidden / 2
    # the plan is still valid, and only the stages and the provenance's pass list moved
    assert from_json(after.to_json()) == after
    assert replace(after, stages=before.stages, provenance=before.provenance) == before


def test_golden_plans_meet_their_latency_targets_after_balancing():
    # the search scores at perfect balance; a plan whose balanced TPOT misses the target is searched
    # again at the balancer's imbalance (mixtral-8x22b: TPOT over 45 ms at first, under it after)
    for path in sorted(PLANS_DIR.glob("*.json")):
        plan = load_plan(path)
        wl = plan.workload
        for name, phase in plan.phases.items():
            p = phase.predictions
            if wl.tpot_slo_ms is not None and p.tpot_ms is not None:
                assert p.tpot_ms <= wl.tpot_slo_ms, (path.name, name, p.tpot_ms)
            if wl.ttft_slo_ms is not None and p.ttft_ms is not None:
                assert p.ttft_ms <= wl.ttft_slo_ms, (path.name, name, p.ttft_ms)
    mixtral = load_plan(PLANS_DIR / "mixtral-8x22b.h100-cluster-2.json")
    assert any(re.match(r"search again at expert imbalance decode 1\.[1-9]", s.name) for s in mixtral.provenance.solvers)


def test_a_re_search_that_finds_nothing_keeps_the_plan_and_says_what_it_misses(monkeypatch):
    import planner.compile as driver
    from costmodels.errors import InfeasibleError

    calls = []

    def first_only(*args, **kwargs):
        calls.append(kwargs["imbalance"])
        if len(calls) > 1:
            raise InfeasibleError("mixtral-8x22b on h100-cluster:2: nothing meets --tpot-ms 46")
        return real(*args, **kwargs)

    real = driver.search
    monkeypatch.setattr(driver, "search", first_only)
    golden = next(g for g in GOLDEN if g.model == "mixtral-8x22b")
    plan, sr = driver.compile_report(golden.model, golden.topology, golden.options)
    assert len(calls) == 2 and calls[1].of("decode", 16) > 1.0  # searched again at the balancer's imbalance
    assert plan.decode.predictions.tpot_ms > 46.0  # the first plan, which misses the target once balanced
    tpot = f"{plan.decode.predictions.tpot_ms:.2f}"
    imb = f"{calls[1].of('decode', 16):.3f}"
    assert sr.notes[-1].startswith(f"TPOT {tpot} ms > 46 once balanced, and at imbalance decode {imb} (16 devices "
                                   f"{imb}): mixtral-8x22b on h100-cluster:2: nothing meets --tpot-ms 46")
    assert plan.search.notes == sr.notes


def test_default_deepseek_plan_meets_tpot_after_balancing():
    # the first choice (168-device decode instances, 2 slots per die) balances to max/mean 1.13 and misses
    # 50 ms; the search again scores that shape at 1.13 and keeps a plan that meets the target
    plan = compile_plan("deepseek-v3", "cloudmatrix384", CompileOptions())
    assert plan.decode.predictions.tpot_ms <= 50.0
    assert any(s.name.startswith("search again at expert imbalance") for s in plan.provenance.solvers)
    assert plan.search.notes[-1].startswith("the first choice had TPOT 50.34 ms > 50 once balanced")
