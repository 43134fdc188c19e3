"""`podplan diff`: semantic changes, expert moves and migration bytes, --fail-on rules and exit codes."""

from __future__ import annotations

import dataclasses
import json

import pytest

from costmodels.errors import InputError
from planner.cli.main import main
from planner.ir.plan import LayerPlacement, Plan, write_plan
from tests.plan_factory import aggregated_plan, synthetic_plan, tiny_plan
from planner.views.diff import DEFAULT_FAIL_ON, check, diff_plans, parse_fail_on
from tests.conftest import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def base() -> Plan:
    return tiny_plan()


def _with_decode(plan: Plan, **changes) -> Plan:
    """The plan with decode predictions changed."""
    pred = dataclasses.replace(plan.decode.predictions, **changes)
    return dataclasses.replace(plan, decode=dataclasses.replace(plan.decode, predictions=pred))


def _with_layer(plan: Plan, phase: str, layer_index: int, phy2log: list[int]) -> Plan:
    ph = plan.phases[phase]
    placement = ph.experts[0]
    layers = list(placement.layers)
    layers[layer_index] = LayerPlacement(layer=layers[layer_index].layer, phy2log=phy2log)
    placement = dataclasses.replace(placement, layers=tuple(layers))
    return dataclasses.replace(plan, **{phase: dataclasses.replace(ph, experts=(placement,))})


def _diff(capsys, tmp_path, old: Plan, new: Plan, *flags: str) -> tuple[int, str, str]:
    a, b = tmp_path / "old.json", tmp_path / "new.json"
    write_plan(old, a)
    write_plan(new, b)
    try:
        rc = main(["diff", str(a), str(b), *flags])
    except SystemExit as exc:
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_identical_plans(base, capsys, tmp_path):
    rc, out, _ = _diff(capsys, tmp_path, base, base)
    assert rc == 0 and "plans are identical" in out and "within thresholds" in out


@pytest.mark.parametrize("factor,flags,rc", [
    (0.98, (), 1),  # throughput -2% > 1% default
    (0.995, (), 0),  # -0.5% is within the default
    (0.98, ("--fail-on", "throughput:-3%"), 0),
    (0.98, ("--fail-on", "decode.throughput:off"), 0),
    (0.98, ("--fail-on", "prefill.throughput:-5%"), 1),  # the decode drop still breaks the unscoped default
    (0.98, ("--fail-on", "none"), 0),
    (1.10, (), 0),  # faster is never a regression
])
def test_throughput_rule(base, capsys, tmp_path, factor, flags, rc):
    new = _with_decode(base, throughput_per_device=base.decode.predictions.throughput_per_device * factor)
    got, out, err = _diff(capsys, tmp_path, base, new, *flags)
    assert got == rc, out + err
    if rc:
        assert "decode throughput per device down 2.00%" in out and "throughput:-1%" in out


def test_tpot_and_ttft_rules(base, capsys, tmp_path):
    slower = _with_decode(base, tpot_ms=base.decode.predictions.tpot_ms * 1.02)
    rc, out, _ = _diff(capsys, tmp_path, base, slower)
    assert rc == 1 and "decode TPOT up 2.00% (3 -> 3.06 ms), limit 1%" in out
    assert _diff(capsys, tmp_path, base, slower, "--fail-on", "tpot:+2.5%")[0] == 0
    pred = dataclasses.replace(base.prefill.predictions, ttft_ms=base.prefill.predictions.ttft_ms * 1.5)
    late = dataclasses.replace(base, prefill=dataclasses.replace(base.prefill, predictions=pred))
    rc, out, _ = _diff(capsys, tmp_path, base, late)
    assert rc == 1 and "prefill TTFT up 50.00%" in out


def test_feasible_to_infeasible(base, capsys, tmp_path):
    broken = _with_decode(base, feasible=False, infeasible_reason="TPOT SLO missed")
    rc, out, _ = _diff(capsys, tmp_path, base, broken)
    assert rc == 1 and "decode: feasible -> infeasible" in out
    assert _diff(capsys, tmp_path, base, broken, "--fail-on", "feasible:off")[0] == 0
    assert _diff(capsys, tmp_path, broken, base)[0] == 0  # fixing a plan is fine


def test_expert_moves_count_devices_not_slots(base, capsys, tmp_path):
    layer = list(base.decode.experts[0].layers[0].phy2log)  # 6 devices x 2 slots
    # swapping the two slots of a device moves nothing: the device holds the same experts
    k = next(k for k in range(6) if layer[2 * k] != layer[2 * k + 1])
    swapped = layer[:]
    swapped[2 * k], swapped[2 * k + 1] = swapped[2 * k + 1], swapped[2 * k]
    d = diff_plans(base, _with_layer(base, "decode", 0, swapped))["phases"]["decode"]["experts"]
    assert (d["moved"], d["changed_slots"]) == (0, 2)
    # swapping slots across two devices moves two experts (one onto each device)
    a, b = next((a, b) for a in range(12) for b in range(12)
                if a // 2 != b // 2 and layer[a] not in layer[b // 2 * 2:b // 2 * 2 + 2]
                and layer[b] not in layer[a // 2 * 2:a // 2 * 2 + 2])
    crossed = layer[:]
    crossed[a], crossed[b] = crossed[b], crossed[a]
    new = _with_layer(base, "decode", 0, crossed)
    d = diff_plans(base, new)["phases"]["decode"]["experts"]
    assert (d["moved"], d["changed_slots"]) == (2, 2)
    assert d["migration_bytes"] == 2 * base.model.expert_bytes
    assert d["layers"] == [{"layer": base.model.moe_layers[0], "moved": 2, "changed_slots": 2}]
    rc, out, _ = _diff(capsys, tmp_path, base, new, "--fail-on", "moved-experts:1")
    assert rc == 1 and "moved-experts:1" in out and "2 experts over all phases" in out
    assert _diff(capsys, tmp_path, base, new, "--fail-on", "moved-experts:2")[0] == 0
    assert _diff(capsys, tmp_path, base, new, "--fail-on", "migration:1KB")[0] == 1
    assert _diff(capsys, tmp_path, base, new, "--fail-on", "migration:1MB")[0] == 0


def test_deployment_changes_are_reported(capsys, tmp_path):
    old = tiny_plan(decode_devices=6)
    new = tiny_plan(decode_devices=4, microbatches=2)  # two decode devices fewer
    d = diff_plans(old, new)
    dec = d["phases"]["decode"]
    assert dec["devices"] == {"old": 6, "new": 4, "old_ids": "2-7", "new_ids": "2-5"}
    changes = {c["field"]: (c["old"], c["new"]) for c in dec["instances"]["changed"][0]["changes"]}
    assert changes["devices"] == ("2-7", "2-5") and changes["ep"] == (6, 4) and changes["microbatches"] == (1, 2)
    assert changes["slots_per_device"] == (2, 3)
    assert dec["experts"]["comparable"] and dec["experts"]["moved"] > 0
    _, out, _ = _diff(capsys, tmp_path, old, new)
    assert "~ instance decode-0:" in out and "devices 2-7 -> 2-5" in out


def test_phase_added_or_removed_and_model_change(capsys, tmp_path):
    both = tiny_plan()
    decode_only = tiny_plan(prefill_devices=0)
    d = diff_plans(both, decode_only)
    assert d["phases"]["prefill"]["status"] == "removed"
    other = tiny_plan("tiny-deepseek-v3")  # MoE layers 1-2 instead of 0-1
    d = diff_plans(both, other)
    assert any(c["field"] == "config_sha256" for c in d["model"]["changes"])
    assert d["phases"]["decode"]["experts"]["comparable"] is False
    rc, _, err = _diff(capsys, tmp_path, both, other)  # another model: refused unless asked for
    assert rc == 2 and "unlike plans (model tiny-mixtral -> tiny-deepseek-v3)" in err
    _, out, _ = _diff(capsys, tmp_path, both, other, "--allow-incomparable")
    assert "model: tiny-deepseek-v3 CHANGED" in out and "experts: not comparable" in out
    assert "unlike plans (model tiny-mixtral -> tiny-deepseek-v3)" in out


def test_aggregated_against_disaggregated_says_the_serving_changed(base, capsys, tmp_path):
    agg = aggregated_plan()
    d = diff_plans(agg, base)
    assert d["serving"] == {"old": "aggregated", "new": "disaggregated"} and d["phases"]["prefill"]["status"] == "added"
    _, out, _ = _diff(capsys, tmp_path, agg, base)
    assert ("serving: aggregated -> disaggregated (the old plan's decode instances also run prefill, so its decode "
            "predictions include the prompt chunks of every step)") in out
    _, out, _ = _diff(capsys, tmp_path, base, agg, "--markdown")
    assert "Serving: disaggregated -> aggregated (the new plan's decode instances also run prefill" in out
    _, out, _ = _diff(capsys, tmp_path, agg, agg)
    assert "serving:" not in out


def test_json_and_markdown_outputs(base, capsys, tmp_path):
    new = _with_decode(base, throughput_per_device=base.decode.predictions.throughput_per_device * 0.9)
    rc, out, _ = _diff(capsys, tmp_path, base, new, "--json")
    doc = json.loads(out)
    assert rc == 1 and doc["exit"] == 1 and doc["rules"] == DEFAULT_FAIL_ON.split(",")
    assert doc["regressions"][0]["metric"] == "throughput" and doc["regressions"][0]["phase"] == "decode"
    tput = next(p for p in doc["phases"]["decode"]["predictions"] if p["metric"] == "throughput_per_device")
    assert tput["delta_pct"] == pytest.approx(-10.0, abs=0.01)
    rc, out, _ = _diff(capsys, tmp_path, base, new, "--markdown")
    assert rc == 1
    assert out.startswith("### podplan diff:") and "| phase | metric | old | new | change |" in out
    assert "| decode | throughput_per_device (tok/s) | 1333 | 1200 | -10.00% :x: |" in out
    assert "**Regressions**" in out and "**:x: 1 regression**" in out


def test_fail_on_parsing():
    rules = {r.text for r in parse_fail_on("throughput:-0.5%,decode.tpot:+2%,moved-experts:100,migration:10GB,ttft:off")}
    assert rules == {"throughput:-0.5%", "tpot:+1%", "decode.tpot:+2%", "ttft:off", "moved-experts:100",
                     "migration:10GB", "feasible:on"}
    assert {r.text for r in parse_fail_on("none,balance:+5%")} == {"balance:+5%"}
    assert parse_fail_on("throughput:0.5%")[0].limit == 0.5  # sign optional
    assert [r.limit for r in parse_fail_on("none,migration:2GiB")] == [2 * 2**30]


@pytest.mark.parametrize("spec,fragment", [
    ("speed:1%", "unknown metric 'speed'"),
    ("throughput:+1%", "throughput regresses when it goes down; write throughput:-1%"),
    ("tpot:-1%", "write tpot:+1%"),
    ("tpot:2", "tpot needs a percentage such as +1%"),
    ("migration:3 parsecs", "needs a size such as 10GB"),
    ("moved-experts:-4", "needs a whole number"),
    ("train.tpot:+1%", "unknown phase 'train'"),
    ("tpot", "no ':LIMIT'"),
    ("tpot:+1%,,", "empty rule"),
    ("feasible:maybe", "takes 'on' or 'off'"),
])
def test_bad_fail_on_specs(spec, fragment):
    with pytest.raises(InputError) as exc:
        parse_fail_on(spec)
    assert fragment in str(exc.value) and "\n" not in str(exc.value)


def test_check_unscoped_count_is_a_total_over_phases(base):
    layer = list(base.prefill.experts[0].layers[0].phy2log)
    layer[0], layer[-1] = layer[-1], layer[0]
    new = _with_layer(base, "prefill", 0, layer)
    d = diff_plans(base, new)
    moved = d["phases"]["prefill"]["experts"]["moved"]
    assert moved == 2
    assert check(d, parse_fail_on(f"none,moved-experts:{moved - 1}"))
    assert not check(d, parse_fail_on(f"none,moved-experts:{moved}"))
    assert not check(d, parse_fail_on("none,decode.moved-experts:0"))


def test_bad_input_exits_2_in_one_line(base, tmp_path):
    good = tmp_path / "good.json"
    write_plan(base, good)
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text("[}")
    proc = run_cli("diff", str(good), str(corrupt))
    assert_one_line_error(proc, "corrupt.json: malformed JSON")
    proc = run_cli("diff", str(good), str(good), "--fail-on", "tpot:-1%")
    assert_one_line_error(proc, "--fail-on 'tpot:-1%'")


def test_bad_input_in_process(base, capsys, tmp_path):
    good = tmp_path / "good.json"
    write_plan(base, good)
    for argv, fragment in ((["diff", str(good), str(tmp_path / "none.json")], "none.json: no such plan file"),
                           (["diff", str(good)], "the following arguments are required: NEW.json"),
                           (["diff", str(good), str(good), "--json", "--markdown"], "not allowed with argument")):
        try:
            rc = main(argv)
        except SystemExit as exc:
            rc = exc.code
        err = capsys.readouterr().err
        assert rc == 2 and fragment in err and len(err.strip().splitlines()) == 1, err


def test_stage_and_pass_changes_are_reported(base, capsys, tmp_path):
    """A pass added to the pipeline changes only stages and provenance.passes: the diff names both."""
    stages = tuple(dataclasses.replace(st, flops_per_token=st.flops_per_token * 2) if st.kind == "routed_experts" else st
                   for st in base.stages)
    passes = (*base.provenance.passes, "toy")
    new = dataclasses.replace(base, stages=stages, provenance=dataclasses.replace(base.provenance, passes=passes))
    d = diff_plans(base, new)["stages"]
    routed = [st.name for st in base.stages if st.kind == "routed_experts"]
    assert d["changed"] == routed and d["added"] == d["removed"] == []
    assert d["passes"] == {"old": list(base.provenance.passes), "new": list(passes)}
    rc, out, _ = _diff(capsys, tmp_path, base, new)
    assert rc == 0 and f"stages changed: {', '.join(routed)}" in out and "-> microbatch => kv-cache" in out
    assert "-> microbatch -> toy" in out
    rc, out, _ = _diff(capsys, tmp_path, base, new, "--markdown")
    assert "**Stages**" in out and f"- stages changed: {', '.join(routed)}" in out
    assert diff_plans(base, base)["stages"] == {"added": [], "removed": [], "changed": []}


def test_unlike_plans_are_refused_in_one_line(base, tmp_path):
    """Plans of another topology (or model) share no devices: no bogus migration, one line and exit 2."""
    other = synthetic_plan("tiny-mixtral", "local:16")
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    write_plan(base, a)
    write_plan(other, b)
    assert_one_line_error(run_cli("diff", str(a), str(b)), "unlike plans (topology local:8 -> local:16)",
                          "--allow-incomparable")
    d = diff_plans(base, other)
    assert d["unlike"] == ["topology local:8 -> local:16"]
    assert all(not ph["experts"]["comparable"] for ph in d["phases"].values() if ph["status"] == "compared")
    proc = run_cli("diff", str(a), str(b), "--allow-incomparable")
    assert proc.returncode in (0, 1) and "moved (" not in proc.stdout and "unlike plans" in proc.stdout


def test_renumbered_devices_holding_the_same_experts_are_not_moves(base):
    """Two decode devices trading all their experts in every layer: new ids, same expert sets, nothing to copy."""
    placement = base.decode.experts[0]
    spd = placement.slots_per_device
    sets = [[set(lp.phy2log[d * spd:(d + 1) * spd]) for d in range(placement.devices)] for lp in placement.layers]
    j, k = next((j, k) for j in range(placement.devices) for k in range(j + 1, placement.devices)
                if any(layer[j] != layer[k] for layer in sets))
    new = base
    for i, lp in enumerate(placement.layers):
        row = list(lp.phy2log)
        row[j * spd:(j + 1) * spd], row[k * spd:(k + 1) * spd] = row[k * spd:(k + 1) * spd], row[j * spd:(j + 1) * spd]
        new = _with_layer(new, "decode", i, row)
    d = diff_plans(base, new)["phases"]["decode"]["experts"]
    assert d["moved"] == 0 and d["migration_bytes"] == 0 and d["renumbered_devices"] == 2
    assert d["changed_slots"] > 0  # the slots did change: the report still says so


def test_unchanged_breakdown_entries_are_not_listed(base):
    b = dict(base.decode.predictions.breakdown)
    stage = sorted(b)[0]
    b[stage] += 1.0
    d = diff_plans(base, _with_decode(base, breakdown=b))
    listed = [p["metric"] for p in d["phases"]["decode"]["predictions"] if p["metric"].startswith("breakdown.")]
    assert listed == [f"breakdown.{stage}"]


def test_a_changed_serving_mode_choice_is_named_with_why(base, capsys, tmp_path):
    from planner.ir.plan import ModeChoice, SearchRecord

    def record(chosen: str, why: str) -> SearchRecord:
        other = "agg" if chosen == "disagg" else "disagg"
        return SearchRecord(modes=(ModeChoice(mode=chosen, chosen=True, requests_per_s=10.0,
                                              output_tokens_per_s_per_device=100.0, devices=8, config="x"),
                                   ModeChoice(mode=other, refused="no plan")), why=why, devices=8,
                            imbalance={"decode": 1.0})

    old = dataclasses.replace(base, search=record("agg", "disagg has no plan"))
    new = dataclasses.replace(base, search=record("disagg", "agg has no plan"))
    d = diff_plans(old, new)
    assert d["search"]["old"] == {"chosen": "agg", "why": "disagg has no plan",
                                  "modes": {"agg": 10.0, "disagg": "refused: no plan"}}
    _, out, _ = _diff(capsys, tmp_path, old, new)
    assert "search: chosen mode agg -> disagg (agg has no plan)" in out
    _, out, _ = _diff(capsys, tmp_path, base, new)  # a plan without a record: nothing to compare
    assert "search:" not in out
