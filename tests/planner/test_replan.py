"""podplan replan: failures and load shifts re-solved with few moved experts, the rest of the plan kept."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from costmodels.errors import InfeasibleError, InputError
from planner.balance.migrate import moved_slots
from planner.ir.plan import devices_of, from_json, load_plan
from planner.balance.loads import read_loads
from planner.balance.repair import repair
from planner.replan import parse_device_ids, replan
from tests.conftest import ROOT, assert_one_line_error, run_cli

GOLDEN = ROOT / "plans" / "deepseek-v3.cloudmatrix384.json"
FAILED = tuple(range(8, 16))  # one whole server of decode-0


@pytest.fixture(scope="module")
def golden():
    return load_plan(GOLDEN)


@pytest.fixture(scope="module")
def replanned(golden):
    """The acceptance case: 8 devices of the DeepSeek-V3 decode plan fail (~40 s on 2 cores)."""
    return replan(golden, failed=FAILED, time_limit=0.1, seed=0)


def _experts(plan, phase):
    """device -> per-layer expert sets of one phase."""
    return {a.device: [set(x) for x in a.experts] for a in devices_of(plan) if a.phase == phase and a.experts}


def test_every_expert_keeps_a_replica_and_failed_devices_are_gone(golden, replanned):
    plan = replanned.plan
    assert from_json(plan.to_json()) == plan  # valid and round-trips
    used = {d for _, inst in plan.instances() for d in inst.devices}
    assert not used & set(FAILED)
    d0, d1 = plan.decode.instances
    assert len(d0.devices) == 80 and d0.ep == 160 and d0.attention_dp == 160
    assert d1 == dataclasses.replace(golden.decode.instances[1], experts=d1.experts)
    assert plan.decode.experts[d1.experts] == golden.decode.experts[0]  # the healthy instance keeps its layout
    new = plan.decode.experts[d0.experts]
    assert new.devices == 80 and new.slots_per_device == 4
    for lp in new.layers:
        assert set(lp.phy2log) == set(range(256))
    assert plan.prefill == golden.prefill


def test_moves_far_fewer_experts_than_from_scratch_within_two_percent(golden, replanned):
    (change,) = replanned.changes
    assert change.instances == ("decode-0",) and (change.devices_before, change.devices_after) == (88, 80)
    # count again from the two plans: experts each surviving device must load
    old, new = _experts(golden, "decode"), _experts(replanned.plan, "decode")
    recount = sum(len(layer - before) for d in new if d < 88
                  for layer, before in zip(new[d], old[d]))
    assert recount == change.moved_slots
    assert change.migration_bytes == change.moved_slots * golden.model.expert_bytes
    assert change.moved_slots < 0.5 * change.scratch_moved
    assert change.balance_after <= 1.02 * change.scratch_balance
    assert change.worst_after <= 1.02 * change.scratch_worst
    print(f"\nreplan 8 failed: moved {change.moved_slots} vs from scratch {change.scratch_moved}; "
          f"max/mean {change.balance_after:.4f} vs {change.scratch_balance:.4f}")


def test_predictions_reestimated_for_the_shrunk_decode(golden, replanned):
    old, new = golden.decode.predictions, replanned.plan.decode.predictions
    assert new.tpot_ms >= old.tpot_ms  # fewer devices, worse balance: not faster
    assert new.tpot_ms < 1.05 * old.tpot_ms
    assert replanned.plan.provenance.options["replans"][-1]["failed_devices"] == "8-15"


def test_repair_keeps_survivors_and_meets_the_target():
    rng = np.random.default_rng(3)
    E, D, S = 16, 6, 4
    load = rng.zipf(1.5, E).astype(float)
    old = np.array([rng.permutation(E)[:S] for _ in range(D + 1)])
    old[:, 0] = np.arange(D + 1) % E  # some structure; device 6 fails
    survivors = old[:D]
    from planner.balance.balancer import balance

    fresh = balance(load[None], D, S, time_limit=0.2)
    target = float(fresh.device_loads[0].max()) * 1.02
    table = repair(load, survivors, fresh.logcnt[0], target)
    assert table is not None and table.shape == (D, S)
    assert set(table.reshape(-1)) == set(range(E))
    assert all(len(set(row)) == S for row in table.tolist())
    assert (np.bincount(table.reshape(-1), minlength=E) == fresh.logcnt[0]).all()
    peak = (load / fresh.logcnt[0])[table].sum(axis=1).max()
    assert peak <= target * (1 + 1e-9)
    old_sets = [tuple(r) for r in survivors]
    assert moved_slots(table, old_sets) <= moved_slots(fresh.phy2log[0].reshape(D, S), old_sets)


def test_parse_device_ids():
    assert parse_device_ids("3,17,40-43", 384) == (3, 17, 40, 41, 42, 43)
    assert parse_device_ids(" 5 , 5,4-5", 8) == (4, 5)
    cases = (("x", "not a device id"), ("9", "out of range 0..7"), ("5-3", "runs backwards"), (",", "no device"))
    for bad, msg in cases:
        with pytest.raises(InputError, match=msg):
            parse_device_ids(bad, 8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny-deepseek-v3 on local:8: prefill 2 x 2 devices (4-7), decode 4 devices (0-3) x 3 slots."""
    from planner.cli.main import main

    path = tmp_path_factory.mktemp("tiny") / "tiny.json"
    assert main(["compile", "tiny-deepseek-v3", "--topology", "local:8", "--decode-devices", "4",
                 "--prefill-devices", "2", "--loads", "zipf:1.2", "-o", str(path)]) == 0
    return path


def test_cli_replan_after_a_failure_then_diff(tiny, tmp_path, capsys):
    out = tmp_path / "new.json"
    proc = run_cli("replan", str(tiny), "--failed-devices", "2", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "decode-0" in proc.stdout and "4 -> 3 x 3 slots" in proc.stdout
    plan = load_plan(out)
    assert plan.decode.instances[0].devices == (0, 1, 3)
    from planner.cli.main import main

    capsys.readouterr()
    assert main(["diff", str(tiny), str(out)]) in (0, 1)
    assert "decode-0" in capsys.readouterr().out


def test_cli_replan_for_new_loads(tiny, tmp_path, capsys):
    from planner.cli.main import main

    out = tmp_path / "shift.json"
    assert main(["replan", str(tiny), "--loads", "hot:2", "--seed", "5", "--phase", "decode", "-o", str(out)]) == 0
    assert "moved" in capsys.readouterr().out
    old, new = load_plan(tiny), load_plan(out)
    assert new.prefill == old.prefill
    assert new.decode.instances == old.decode.instances
    assert new.decode.experts != old.decode.experts


def test_cli_refusals_are_one_line_and_write_nothing(tiny, tmp_path, capsys):
    from planner.cli.main import main

    out = tmp_path / "x.json"
    assert_one_line_error(run_cli("replan", str(tiny), "--failed-devices", "1,2", "-o", str(out)),
                          "fewer than the 8 experts")  # 2 devices x 3 slots < 8 experts
    assert not out.exists()
    cases = [
        (("--failed-devices", "0-3"), "loses all its attention devices"),
        (("--failed-devices", "9"), "out of range 0..7"),
        ((), "nothing to do"),
        (("--loads", "zipf:x"), "zipf:S needs an exponent"),
    ]
    for args, msg in cases:  # in-process: the same main() the console script runs
        capsys.readouterr()
        assert main(["replan", str(tiny), *args, "-o", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
        assert not out.exists()


def test_refuses_when_the_plan_cannot_say_its_loads(tmp_path):
    from tests.plan_factory import tiny_plan

    plan = tiny_plan()  # synthetic: no 'loads' option
    with pytest.raises(InputError, match="pass --loads"):
        replan(plan, failed=(5,))
    afd = tiny_plan(decode_mode="disaggregated")  # decode: attention 2-4, experts 5-7
    with pytest.raises(InfeasibleError, match="loses all its expert devices"):
        replan(afd, failed=(5, 6, 7), loads=np.ones((2, 8)))
    # an attention device alone: the instance shrinks, its expert placement stays
    result = replan(afd, failed=(3,), loads=np.ones((2, 8)), phases=())
    inst = result.plan.decode.instances[0]
    assert inst.attention_devices == (2, 4) and inst.attention_dp == 2 and not result.changes
    assert result.plan.decode.experts == afd.decode.experts


def test_a_later_replan_rereads_the_loads_a_replan_applied(tiny):
    from planner.replan import plan_loads

    plan = load_plan(tiny)
    shifted = read_loads("hot:2", layers=2, experts=8, seed=5)
    result = replan(plan, loads=shifted, loads_spec="hot:2", seed=5, estimate=False)
    assert (plan_loads(result.plan, None) == shifted).all()
    assert (plan_loads(plan, None) == read_loads("zipf:1.2", layers=2, experts=8, seed=0)).all()


def test_an_aggregated_plan_is_reestimated_with_its_prompt_chunk():
    """A one-phase (aggregated) plan's instances also run prefill: after a failure its step still
    carries the prompt chunk and it still predicts TTFT (not re-scored as plain decode)."""
    plan = load_plan(ROOT / "plans" / "mixtral-8x22b.h100-cluster-2.json")
    assert plan.prefill is None
    failed = plan.decode.instances[0].devices[-1]
    new = replan(plan, failed=[failed]).plan
    before, after = plan.decode.predictions, new.decode.predictions
    assert "prefill_chunk" in after.breakdown and after.ttft_ms is not None
    assert after.tpot_ms >= before.tpot_ms * 0.98  # one device fewer serves no faster
