"""Goodput-driven choices: the deployment `podplan compile --rate` keeps, the change `podplan diff --rate`
reports. Both simulate Poisson arrivals of the workload's lengths against its SLOs."""

from __future__ import annotations

from typing import Sequence

from costmodels.model_shape import ModelShape
from costmodels.serving import DecodeDeployment, PrefillDeployment
from costmodels.topology import Topology
from planner.ir.plan import Plan, Workload
from planner.simulate.fleet import Fleet, decode_instance, fleet_of_plan, prefill_instance
from planner.simulate.report import Settings, Slo, simulate
from planner.simulate.workload import ArrivalSpec, LengthSpec

# Seconds of arrivals each candidate or plan is simulated for (the run then drains): at most
# CHOICE_DURATION, enough for CHOICE_REQUESTS requests or 20 unloaded request latencies.
CHOICE_DURATION = 120.0
CHOICE_REQUESTS = 50_000


def choice_duration(fleet: Fleet, rate: float) -> float:
    """Seconds of arrivals for a goodput comparison at `rate` (bounded work on fast and slow models)."""
    return min(CHOICE_DURATION, max(20.0 * fleet.nominal_latency_s, CHOICE_REQUESTS / rate))


def fleet_of_deployments(shape: ModelShape, topo: Topology, wl: Workload, prefill: PrefillDeployment,
                         prefill_instances: int, decode: DecodeDeployment, decode_instances: int) -> Fleet:
    """A fleet of identical instances per phase (what the search proposes before placement)."""
    pre = [prefill_instance(f"prefill-{i}", prefill, shape, topo) for i in range(prefill_instances)]
    dec = [decode_instance(f"decode-{i}", decode, shape, topo) for i in range(decode_instances)]
    devices = sum(p.devices for p in pre) + sum(d.devices for d in dec)
    return Fleet(f"{shape.name} on {topo.name}", shape, topo, wl, pre, dec, devices)


def goodput_at(fleet: Fleet, rate: float, seed: int = 0, duration: float | None = None) -> dict:
    """Goodput (req/s, req/s per device) and p90 latencies of `fleet` under Poisson arrivals at `rate`."""
    wl = fleet.workload
    duration = duration or choice_duration(fleet, rate)
    rep = simulate(fleet, ArrivalSpec("poisson", rate), LengthSpec(wl.input_len, wl.output_len),
                   Settings(duration=duration, seed=seed), Slo(wl.ttft_slo_ms, wl.tpot_slo_ms))
    return {"rate": rate, "duration_s": round(duration, 3), "goodput": rep["goodput"]["requests_per_s"],
            "goodput_per_device": rep["goodput"]["requests_per_s_per_device"],
            "p90_ttft_ms": rep["ttft_ms"]["p90"], "p90_tpot_ms": rep["tpot_ms"]["p90"]}


def best_for_rate(fleets: Sequence[Fleet], rate: float, seed: int = 0) -> tuple[int, list[dict]]:
    """The index of the fleet with the most goodput at `rate` (ties: the earlier one), and every score."""
    scores = [goodput_at(f, rate, seed) for f in fleets]
    best = max(range(len(fleets)), key=lambda i: (round(scores[i]["goodput"], 6), -i))
    return best, scores


def goodput_change(old: Plan, new: Plan, rate: float, seed: int = 0) -> dict:
    """Goodput of two plans at `rate` (each against its own workload's lengths and SLOs) and the change;
    both are simulated for the same duration (the longer of the two plans' choices)."""
    fa, fb = fleet_of_plan(old), fleet_of_plan(new)
    duration = max(choice_duration(fa, rate), choice_duration(fb, rate))
    a, b = goodput_at(fa, rate, seed, duration), goodput_at(fb, rate, seed, duration)
    pct = None if a["goodput"] == 0 else round((b["goodput"] - a["goodput"]) / a["goodput"] * 100.0, 3)
    return {"rate": rate, "seed": seed, "duration_s": round(duration, 3), "old": a, "new": b, "delta_pct": pct}
