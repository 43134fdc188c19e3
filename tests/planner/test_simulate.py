"""`planner.simulate`: the event loop against queueing theory and the cost model's steady state."""

from __future__ import annotations

import dataclasses
import math
import json
from pathlib import Path

import numpy as np
import pytest

from costmodels.aggregated import estimate_aggregated
from costmodels.errors import InputError
from costmodels.serving import estimate_decode, estimate_prefill
from planner.ir.plan import load_plan
from planner.simulate.engine import decode_steps, run
from planner.simulate.fleet import bucket_edges, fleet_of_plan
from planner.simulate.report import Settings, Slo, latencies, simulate, sweep
from planner.simulate.workload import ArrivalSpec, LengthSpec, Requests, generate, parse_arrivals, parse_lengths

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "plans" / "tiny-deepseek-v3.local-8.json"
DSV3 = ROOT / "plans" / "deepseek-v3.cloudmatrix384.json"


@pytest.fixture(scope="module")
def tiny():
    return fleet_of_plan(load_plan(TINY))


@pytest.fixture(scope="module")
def agg_plan():
    """tiny-deepseek-v3 on local:8 in aggregated serving (one decode phase that also prefills)."""
    from planner.compile import CompileOptions, compile_plan

    plan = compile_plan("tiny-deepseek-v3", "local:8", CompileOptions(mode="agg"))
    assert plan.prefill is None
    return plan


def _fixed(n: int, rate: float, inp: int, out: int, seed: int = 0) -> Requests:
    return generate(ArrivalSpec("poisson", rate), LengthSpec(inp, out), n / rate, seed)


def test_fleet_reproduces_the_plans_predictions():
    """One source of truth: the deployments rebuilt from the plan give the plan's own numbers."""
    plan = load_plan(DSV3)
    fleet = fleet_of_plan(plan)
    dec = estimate_decode(fleet.shape, fleet.topo, fleet.decode[0].dep)
    pre = estimate_prefill(fleet.shape, fleet.topo, fleet.prefill[0].dep)
    assert plan.decode is not None and plan.prefill is not None
    assert dec.step_ms == pytest.approx(plan.decode.predictions.step_ms, rel=1e-5)
    assert dec.tpot_ms == pytest.approx(plan.decode.predictions.tpot_ms, rel=1e-5)
    assert pre.ttft_ms == pytest.approx(plan.prefill.predictions.ttft_ms, rel=1e-5)
    # capacity is the plan's batch: 96 sequences on each of the 88 attention devices
    inst = plan.decode.instances[0]
    assert inst.batch_per_device == 96 and len(inst.attention_devices) == 88
    assert fleet.decode[0].cap == 88 * 96 and len(fleet.decode) == 2 and len(fleet.prefill) == 5
    pinst = plan.prefill.instances[0]
    assert fleet.prefill[0].budget == round(pinst.batch_per_device * len(pinst.devices))
    # the step time the simulation uses at the plan's batch and mean context is the plan's step
    d = fleet.decode[0]
    assert d.step_ms(fleet.shape, fleet.topo, d.cap, d.dep.kv_len) == pytest.approx(dec.step_ms, rel=0.01)


def test_aggregated_fleet_reproduces_the_plans_predictions(agg_plan):
    """An aggregated instance's mixed step at the plan's batch and chunk is the plan's step; its TTFT
    the plan's ceil(prompt / one die's chunk) steps; the design rate the search's."""
    fleet = fleet_of_plan(agg_plan)
    assert fleet.aggregated and not fleet.prefill
    pred, wl = agg_plan.decode.predictions, agg_plan.workload
    d = fleet.decode[0]
    c = d.chunks
    assert c is not None and d.cap == round(agg_plan.decode.instances[0].batch_per_device * d.attention_devices)
    step = d.step_ms(fleet.shape, fleet.topo, d.cap, d.dep.kv_len) + c.ms(fleet.shape, fleet.topo, c.budget)
    assert step == pytest.approx(pred.step_ms, rel=1e-4)
    assert math.ceil(wl.input_len / c.piece) * step == pytest.approx(pred.ttft_ms, rel=1e-4)
    est = estimate_aggregated(fleet.shape, fleet.topo, c.dep)
    assert est.step_ms == pytest.approx(pred.step_ms, rel=1e-5)
    assert fleet.design_rate == pytest.approx(est.throughput_per_device * fleet.devices / wl.output_len, rel=1e-9)


def test_aggregated_saturation_throughput_is_the_cost_models(agg_plan):
    """Offered far above capacity, every aggregated instance's decode batch fills and stays full, each
    step also carries a full chunk, and output tokens/s per device is the estimate's."""
    fleet = fleet_of_plan(agg_plan)
    wl = agg_plan.workload
    horizon = 120.0
    reqs = generate(ArrivalSpec("poisson", 4 * fleet.design_rate), LengthSpec(wl.input_len, wl.output_len), horizon, 0)
    o = run(fleet, reqs, seed=0, horizon=horizon)
    cap = sum(d.cap for d in fleet.decode)
    t, active = np.array(o.samples["t"]), np.array(o.samples["decode_active"])
    start = float(t[np.argmax(active == cap)])
    # full but for a step now and then: a sequence can leave a step before the prompt taking its slot is done
    assert 0 < start < horizon / 2 and active[t >= start].min() >= 0.98 * cap
    assert active[t >= start].mean() >= 0.995 * cap
    window = (o.step_end > start) & (o.step_end <= horizon)
    rate = o.step_tokens[window].sum() / (horizon - start) / fleet.devices
    est = estimate_aggregated(fleet.shape, fleet.topo, fleet.decode[0].chunks.dep)
    assert rate == pytest.approx(est.throughput_per_device, rel=0.02)


def test_aggregated_prompt_alone_takes_its_chunks(agg_plan):
    """Requests far apart: a prompt runs one die's chunk per step on an otherwise idle instance, so its
    TTFT is ceil(prompt / piece) steps of one sequence plus a piece; nothing waits."""
    fleet = fleet_of_plan(agg_plan)
    d = fleet.decode[0]
    c = d.chunks
    L = 3 * c.piece + 5
    reqs = Requests(np.arange(10) * 100.0, np.full(10, L), np.full(10, 4))
    o = run(fleet, reqs, seed=0)
    ttft, _ = latencies(o)
    steps = [d.step_ms(fleet.shape, fleet.topo, 1, fleet.workload.input_len) + c.ms(fleet.shape, fleet.topo, x)
             for x in (c.piece, c.piece, c.piece, 5)]
    assert np.allclose(ttft, sum(steps), rtol=1e-9)
    assert o.prefill_batches == 40 and np.isfinite(o.finish).all()


def test_md1_mean_wait_matches_pollaczek_khinchine(tiny):
    """One prefill instance serving one prompt per batch (deterministic service S) under Poisson
    arrivals at load rho: the mean wait in queue is rho S / (2 (1 - rho))."""
    L = 16
    one = dataclasses.replace(tiny.prefill[0], budget=L, piece=L, cache={})
    fleet = dataclasses.replace(tiny, prefill=[one])
    service, kv = one.batch_ms(fleet.shape, fleet.topo, L, L, L)
    rho = 0.7
    rate = rho / (service / 1e3)
    reqs = _fixed(60000, rate, L, 2)
    o = run(fleet, reqs, seed=0)
    ttft, _ = latencies(o)
    wait = ttft - service - kv
    assert wait.min() > -1e-6  # nobody is served faster than S
    expected = rho * service / (2 * (1 - rho))
    assert float(wait.mean()) == pytest.approx(expected, rel=0.06)
    # at rho = 0.7 the M/D/1 wait is half the M/M/1 one: the loop is not accidentally exponential
    assert float(wait.mean()) < 0.75 * rho * service / (1 - rho)


def test_decode_saturation_throughput_is_the_cost_models(tiny):
    """Offered far above decode capacity, the decode batch fills once the first full prefill batch
    lands, stays full, and tokens/s per device is the estimate's throughput at the plan's batch and
    the stream's mean context."""
    inp, out, horizon = 16, 64, 10.0
    reqs = _fixed(50000, 5000.0, inp, out)
    o = run(tiny, reqs, seed=0, horizon=horizon)
    d = tiny.decode[0]
    est = estimate_decode(tiny.shape, tiny.topo, dataclasses.replace(d.dep, kv_len=inp + out // 2))
    t, active = np.array(o.samples["t"]), np.array(o.samples["decode_active"])
    start = float(t[np.argmax(active == d.cap)])
    # a full prefill batch takes seconds now (the plan's 4.6 s TTFT), so the batch fills after a ramp
    assert 0 < start <= 3.0 and (active[t >= start] == d.cap).all()
    window = (o.step_end > start) & (o.step_end <= horizon)
    rate = o.step_tokens[window].sum() / (horizon - start) / d.devices
    assert rate == pytest.approx(est.throughput_per_device, rel=0.01)


def test_prefill_saturation_throughput_is_the_cost_models(tiny):
    """Offered far above prefill capacity, every batch after the ramp holds the plan's token budget
    and prompt tokens/s per device is the estimate's."""
    inp = 16
    p = tiny.prefill[0]
    est = estimate_prefill(tiny.shape, tiny.topo, p.dep)
    full_s = est.step_ms / 1e3  # one batch at the plan's tokens per device (seconds on the tiny plan)
    rate = 4 * p.budget / inp / full_s
    horizon = 12 * full_s
    o = run(tiny, generate(ArrivalSpec("poisson", rate), LengthSpec(inp, 1), horizon, 0), seed=0, horizon=horizon)
    t = o.first_token - est.breakdown["kv_transfer"] / 1e3  # batch end
    ends, counts = np.unique(t[~np.isnan(t)], return_counts=True)
    full = counts * inp == p.budget
    first = int(np.argmax(full))
    assert full[first:].all() and full.sum() >= 8  # saturated: every later batch is full
    tokens = counts[first + 1:].sum() * inp  # the batches that ran between the first full one's end and the last's
    assert tokens / (ends[-1] - ends[first]) / p.devices == pytest.approx(est.throughput_per_device, rel=0.01)


def test_mtp_steps_are_exact():
    rng = np.random.default_rng(0)
    n = np.full(20000, 1023)
    assert (decode_steps(n, 0.0, rng) == 1023).all()
    assert (decode_steps(n, 1.0, rng) == 512).all()
    s = decode_steps(n, 0.7, rng)
    assert float(s.mean()) == pytest.approx(1023 / 1.7, rel=0.003)
    assert s.min() >= 512 and s.max() <= 1023
    small = decode_steps(np.array([0, 1, 2]), 0.5, rng)
    assert small[0] == 0 and small[1] == 1 and small[2] in (1, 2)


def test_same_seed_same_report_other_seed_other_stream(tiny):
    lengths = LengthSpec(16, 8)
    args = (tiny, ArrivalSpec("gamma", 50000.0, 2.0), lengths)
    a = simulate(*args, Settings(duration=0.5, seed=3), Slo(None, 1.0))
    b = simulate(*args, Settings(duration=0.5, seed=3), Slo(None, 1.0))
    c = simulate(*args, Settings(duration=0.5, seed=4), Slo(None, 1.0))
    strip = lambda r: json.dumps({k: v for k, v in r.items() if k != "outcome"}, sort_keys=True)  # noqa: E731
    assert strip(a) == strip(b)
    assert strip(a) != strip(c)


def test_gamma_arrivals_have_the_rate_and_cv():
    reqs = generate(ArrivalSpec("gamma", 100.0, 3.0), LengthSpec(1, 1), 2000.0, 0)
    gaps = np.diff(reqs.arrival)
    assert len(reqs) / 2000.0 == pytest.approx(100.0, rel=0.05)
    assert float(gaps.std() / gaps.mean()) == pytest.approx(3.0, rel=0.1)


def test_overload_leaves_requests_unfinished_and_goodput_saturates(tiny):
    slo = Slo(None, None)
    d = tiny.decode[0]
    step = estimate_decode(tiny.shape, tiny.topo, dataclasses.replace(d.dep, kv_len=16 + 32)).step_ms / 1e3
    capacity = d.cap / (63 * step)  # the full decode batch over the 63 steps of a 64-token output
    run_s = Settings(duration=10.0)
    below = simulate(tiny, ArrivalSpec("poisson", 0.5 * capacity), LengthSpec(16, 64), run_s, slo)
    above = simulate(tiny, ArrivalSpec("poisson", 4 * capacity), LengthSpec(16, 64), run_s, slo)
    assert below["unfinished"] == 0 and below["goodput"]["share"] == 1.0
    assert above["unfinished"] > 0 and above["tpot_ms"]["p99"] is None
    assert above["goodput"]["requests_per_s"] == pytest.approx(capacity, rel=0.1)


def test_sweep_finds_the_knee(tiny):
    """Under an SLO the full batch meets, the knee is the decode capacity (the full batch over the 63
    steps of a 64-token output): a rate well below passes, twice it fails, bisection lands near it."""
    d = tiny.decode[0]
    step = estimate_decode(tiny.shape, tiny.topo, dataclasses.replace(d.dep, kv_len=16 + 32)).step_ms
    capacity = d.cap / (63 * step / 1e3)
    res = sweep(tiny, ArrivalSpec("poisson", 0.0), LengthSpec(16, 64), Settings(duration=10.0),
                Slo(None, 1.2 * step), rates=[0.25 * capacity, 0.5 * capacity, 2 * capacity])
    ok = {p["rate"]: p["meets_slo"] for p in res["points"]}
    assert [ok[round(f * capacity, 4)] for f in (0.25, 0.5, 2)] == [True, True, False]
    assert 0.8 * capacity <= (res["max_rate"] or 0) < 1.05 * capacity
    assert len(res["points"]) == 3 + 4  # the grid, then four bisection steps


def test_trace_round_trip_and_time_scaling(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"arrival_s": i * 0.5, "input_len": 10 + i, "output_len": 2}) + "\n"
                            for i in range(11)))
    spec = parse_arrivals(str(path))
    assert spec.kind == "trace" and spec.rate == pytest.approx(2.0)
    reqs = generate(spec.at_rate(4.0), LengthSpec(), 100.0, 0)
    assert np.allclose(reqs.arrival, np.arange(11) * 0.25)
    assert list(reqs.input_len) == list(range(10, 21))
    assert parse_lengths(str(path)).trace is not None


@pytest.mark.parametrize("text, fragment", [
    ("poisson:-3", "must be a finite number > 0"),
    ("poisson", "poisson takes one rate"),
    ("no-such-trace.jsonl", "no such trace file"),
    ("gamma:10", "gamma takes a rate and a CV"),
    ("poisson:abc", "is not a number"),
])
def test_bad_arrivals_name_the_fix(text, fragment):
    with pytest.raises(InputError, match=fragment):
        parse_arrivals(text)


def test_bad_trace_line_names_file_and_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"arrival_s": 0, "input_len": 5, "output_len": 1}\n{"arrival_s": 1, "input_len": 0}\n')
    with pytest.raises(InputError, match=r"t.jsonl:2: input_len 0 must be a whole number >= 1"):
        parse_arrivals(str(path))


def test_bucket_edges_never_undercount():
    for cap in (1, 31, 33, 500, 5632):
        e = bucket_edges(cap)
        n = np.arange(cap + 1)
        assert (e >= n).all() and e[cap] == cap and (np.diff(e) >= 0).all()
        assert len(set(e.tolist())) <= 300  # few cost-model calls


def test_long_prompts_are_chunked_over_batches(tiny):
    """A prompt three pieces long takes three batches of its instance (sparse arrivals: alone in each)."""
    one = dataclasses.replace(tiny.prefill[0], budget=64, piece=16, cache={})
    fleet = dataclasses.replace(tiny, prefill=[one])
    reqs = Requests(np.arange(20) * 1.0, np.full(20, 48), np.full(20, 2))
    o = run(fleet, reqs, seed=0)
    assert o.prefill_batches == 60
    piece, kv = one.batch_ms(fleet.shape, fleet.topo, 16, 16, 16)
    ttft, _ = latencies(o)
    assert (ttft > 3 * piece).all()  # later pieces attend to the earlier ones: no faster than three first pieces


def test_unchunked_batches_wait_for_room(tiny):
    """Three 40-token prompts at once and a budget of 64: chunked, batches of 40 + 24 and 16 + 40;
    unchunked, every prompt waits for a batch with room for all of it (three batches)."""
    one = dataclasses.replace(tiny.prefill[0], budget=64, piece=64, cache={})
    fleet = dataclasses.replace(tiny, prefill=[one])
    reqs = Requests(np.zeros(3), np.full(3, 40), np.full(3, 2))
    chunked = run(fleet, reqs, seed=0, chunked=True)
    unchunked = run(fleet, reqs, seed=0, chunked=False)
    assert chunked.prefill_batches == 2 and unchunked.prefill_batches == 3
    assert chunked.first_token[1] == chunked.first_token[2]  # the chunked one finishes with the third
    assert len(set(unchunked.first_token.tolist())) == 3
