"""Heterogeneous topologies: GROUP+GROUP names, assigning phases to groups, the KV hand-off, v3 plans."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from costmodels.errors import TopologyError
from costmodels.handoff import kv_handoff
from costmodels.serving import PrefillDeployment
from costmodels.topology import MixedTopology, get_any_topology, get_topology
from planner.cli.main import main
from planner.compile import CompileOptions
from planner.frontend.trace import model_shape
from planner.hetero import compile_mixed
from planner.ir.errors import PlanError
from planner.ir.plan import Workload, from_json, load_plan
from tests.conftest import ROOT

MIXED = "h100-cluster:1+h200-cluster:1"
MODEL = "qwen3-30b-a3b"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    mixed = get_any_topology(MIXED)
    assert isinstance(mixed, MixedTopology)
    plan, res = compile_mixed(MODEL, mixed, CompileOptions(Workload(4096, 1024, tpot_slo_ms=50.0, quant="fp8")))
    path = tmp_path_factory.mktemp("hetero") / "mixed.json"
    path.write_text(plan.to_json())
    return plan, res, str(path)


def test_parse_groups_in_device_order():
    t = get_any_topology("H100-cluster:2 + h200-cluster:1")
    assert isinstance(t, MixedTopology)
    assert t.name == "h100-cluster:2+h200-cluster:1"
    assert [(g.name, g.first_device, g.topology.num_devices) for g in t.groups] == [
        ("h100-cluster:2", 0, 16), ("h200-cluster:1", 16, 8)]
    assert t.num_devices == 24 and t.group_of(16).name == "h200-cluster:1"
    # the inter-group link is the slower scale-out NIC of the two ends (400 Gb/s IB per GPU on both)
    assert t.link_gbps("h100-cluster:2", "h200-cluster:1") == 50.0


def test_single_group_names_are_the_plain_topology():
    for name in ("h200-cluster:16", "cloudmatrix384", "local:8"):
        plain, any_ = get_topology(name), get_any_topology(name)
        assert type(any_) is type(plain) and any_.digest() == plain.digest()


@pytest.mark.parametrize("name,words", [
    ("h100-cluster:8+", "group 2 is empty"),
    ("+h200-cluster:8", "group 1 is empty"),
    ("h100-cluster:8++h200-cluster:8", "group 2 is empty"),
    ("h100-cluster:8+tpu-pod:4", "group 2 'tpu-pod:4' is not a topology"),
    ("h200-cluster:2+h200-cluster:2", "given twice"),
    ("cloudmatrix384+h200-cluster:8", "dies per device"),
    ("local:2+h200-cluster:1", "no scale-out network"),
])
def test_bad_mixed_names(name, words):
    with pytest.raises(TopologyError, match=words):
        get_any_topology(name)


def test_bad_mixed_name_on_the_cli_is_one_line_exit_2(tmp_path, capsys):
    assert main(["compile", MODEL, "--topology", "h100-cluster:1+nope:2", "-o", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "group 2 'nope:2' is not a topology" in err[0]
    assert not (tmp_path / "x.json").exists()


def test_phases_go_to_the_group_that_pays(compiled):
    plan, res, _ = compiled
    win = res.chosen
    # H200 (141 GB, 4.8 TB/s) holds more sequences per device: decode there, compute-bound prefill on H100
    assert win.split and (win.prefill, win.decode) == ("h100-cluster:1", "h200-cluster:1")
    assert {i.group for i in plan.prefill.instances} == {"h100-cluster:1"}
    assert {i.group for i in plan.decode.instances} == {"h200-cluster:1"}
    assert all(d < 8 for i in plan.prefill.instances for d in i.devices)
    assert all(d >= 8 for i in plan.decode.instances for d in i.devices)
    # both groups alone and the reverse split were tried and serve less
    labels = [a.label for a in res.assignments]
    assert "prefill on h200-cluster:1, decode on h100-cluster:1" in labels
    assert any(label.startswith("h100-cluster:1 alone") for label in labels)
    assert all(a.requests_per_s <= win.requests_per_s for a in res.assignments)
    assert "H100 SXM" in res.why and "H200 SXM" in res.why
    runs = [s.name for s in plan.provenance.solvers]
    assert runs[0] == f"assign {win.label}"


def test_side_by_side_groups_are_reported_not_chosen(compiled):
    _, res, _ = compiled
    alone = [a.requests_per_s for a in res.assignments if a.search is not None]
    assert res.side_by_side == pytest.approx(sum(alone))
    # two separate plans beat the split here: the summary says so and what to do
    assert res.side_by_side > res.chosen.requests_per_s
    assert "compile each group separately" in res.side_by_side_note()


def test_kv_handoff_is_in_ttft_and_scales_with_prompt_length(compiled):
    plan, res, _ = compiled
    h = res.chosen.handoff
    assert h is not None and h.transfer_ms > 0
    pred = plan.prefill.predictions
    assert pred.breakdown["kv_transfer"] == pytest.approx(h.transfer_ms, rel=1e-4)
    assert pred.ttft_ms == pytest.approx(pred.step_ms + h.transfer_ms, rel=1e-4)
    shape = model_shape(MODEL)
    topo = get_topology("h100-cluster:1")
    dep = PrefillDeployment(devices=1, tokens_per_device=32768, prompt_len=2048, quant="fp8")
    short = kv_handoff(shape, topo, dep, 50.0, 4.5)
    long = kv_handoff(shape, topo, replace(dep, prompt_len=4096), 50.0, 4.5)
    assert long.bytes_per_request == pytest.approx(2 * short.bytes_per_request)
    slow = kv_handoff(shape, topo, dep, 25.0, 4.5)  # half the link: the bytes take twice as long
    assert slow.transfer_ms - slow.latency_us / 1e3 == pytest.approx(2 * (short.transfer_ms - short.latency_us / 1e3))


def test_mixed_plan_is_v3_and_round_trips(compiled):
    plan, _, path = compiled
    assert plan.schema_version == 3
    assert [g.name for g in plan.topology.groups] == ["h100-cluster:1", "h200-cluster:1"]
    again = load_plan(path)
    assert again.to_json() == plan.to_json()


def test_v2_plans_still_load_and_single_hardware_plans_carry_no_groups():
    plan = load_plan(ROOT / "plans" / "tiny-deepseek-v3.local-8.json")
    assert not plan.topology.groups
    assert '"group"' not in plan.to_json() and '"groups"' not in plan.to_json()
    doc = json.loads(plan.to_json())  # the same plan as an earlier podplan wrote it: version 2, no search
    doc.pop("search", None)
    doc["schema_version"] = 2
    old = from_json(json.dumps(doc))
    assert old.schema_version == 2 and json.loads(old.to_json()) == doc


def test_groups_need_v3_and_instances_name_their_group(compiled):
    plan, _, _ = compiled
    doc = json.loads(plan.to_json())
    doc["schema_version"] = 2
    with pytest.raises(PlanError, match="hardware groups need schema_version 3"):
        from_json(json.dumps(doc))
    doc = json.loads(plan.to_json())
    doc["decode"]["instances"][0]["group"] = "h100-cluster:1"
    with pytest.raises(PlanError, match=r"plan.decode.instances\[0\].devices\[0\]: device 8 is not in group"):
        from_json(json.dumps(doc))
    doc = json.loads(plan.to_json())
    del doc["decode"]["instances"][0]["group"]
    with pytest.raises(PlanError, match="missing: an instance of a mixed topology names its group"):
        from_json(json.dumps(doc))


@pytest.mark.parametrize("argv", [
    ["run", "{plan}"],
    ["export", "{plan}", "--format", "sglang", "-o", "{tmp}/export"],
    ["simulate", "{plan}"],
    ["replan", "{plan}", "--failed-devices", "1", "-o", "{tmp}/replanned.json"],
])
def test_commands_that_need_one_kind_of_hardware_refuse_a_mixed_plan(compiled, tmp_path, capsys, argv):
    _, _, path = compiled
    args = [a.format(plan=path, tmp=tmp_path) for a in argv]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"is a plan for the mixed topology {MIXED}" in err[0] and "compile for one group" in err[0]
    assert "Traceback" not in err[0]


def test_estimate_refuses_a_mixed_topology(capsys):
    assert main(["estimate", MODEL, "--phase", "decode", "--topology", MIXED]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mixes hardware groups" in err[0] and "--topology h100-cluster:1" in err[0]


def test_views_name_each_instances_hardware(compiled, capsys, tmp_path):
    _, _, path = compiled
    assert main(["show", path, "--format", "dot"]) == 0
    out = capsys.readouterr().out
    assert "on H100 SXM (h100-cluster:1)" in out and "on H200 SXM (h200-cluster:1)" in out
    assert main(["diff", path, path]) == 0
    out = capsys.readouterr().out
    assert "hardware: H100 SXM (h100-cluster:1)" in out and "hardware: H200 SXM (h200-cluster:1)" in out


def test_compile_cli_says_which_group_serves_which_phase_and_is_deterministic(compiled, tmp_path, capsys):
    plan, _, _ = compiled
    out_path = tmp_path / "cli.json"
    assert main(["compile", MODEL, "--topology", MIXED, "--tpot-ms", "50", "-o", str(out_path)]) == 0
    out = capsys.readouterr().out
    assert "prefill on h100-cluster:1 (H100 SXM)" in out and "decode on h200-cluster:1 (H200 SXM)" in out
    assert "KV hand-off to h200-cluster:1" in out and "assignments of phases to groups" in out
    # the same inputs give the same plan, byte for byte
    assert out_path.read_text() == plan.to_json()


@pytest.mark.parametrize("flags,words", [
    (["--devices", "8"], "--devices 8: a mixed topology (h100-cluster:1+h200-cluster:1) is planned whole"),
    (["--rate", "5"], "--rate 5: not supported on a mixed topology"),
])
def test_compile_flags_a_mixed_topology_cannot_take(tmp_path, capsys, flags, words):
    assert main(["compile", MODEL, "--topology", MIXED, *flags, "-o", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]
    assert not (tmp_path / "x.json").exists()
