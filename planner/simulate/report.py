"""What a simulation says: latency percentiles, throughput, goodput, queues; and sweeps over rate.

Latencies of requests that did not finish before the horizon count as infinite: a percentile that
lands on them is reported as null (JSON) / "unfinished" (text), never as a small number.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from costmodels.errors import InputError
from planner.simulate.engine import Outcome, run
from planner.simulate.fleet import Fleet
from planner.simulate.workload import ArrivalSpec, LengthSpec, generate

PERCENTILES = (50, 90, 99)
# Rates of a default sweep, as fractions of the plan's design rate.
SWEEP_FRACTIONS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5)
BISECT_STEPS = 4
# A run keeps up when it completes at least this share of the offered rate over its served span: a
# short run at a rate past capacity can meet a p90 SLO while its backlog grows (TPOT dilutes the wait
# over the whole output), so a sweep also asks for this.
KEEPS_UP = 0.97
# Queue samples kept in a report (the engine samples every duration / QUEUE_POINTS).
QUEUE_POINTS = 200


@dataclass(frozen=True)
class Slo:
    """The SLOs goodput counts against (None: not constrained)."""

    ttft_ms: float | None
    tpot_ms: float | None

    @property
    def text(self) -> str:
        parts = [f"TTFT <= {self.ttft_ms:g} ms" if self.ttft_ms else "", f"TPOT <= {self.tpot_ms:g} ms" if self.tpot_ms else ""]
        return " and ".join(p for p in parts if p) or "none"


@dataclass(frozen=True)
class Settings:
    """How to run: the stream's length (s), seed, and prefill chunking."""

    duration: float = 120.0
    seed: int = 0
    chunked: bool = True

    def horizon(self, fleet: Fleet) -> float:
        """When the clock stops: arrivals stop at `duration`, then the system drains for as long again,
        and at least ten times one request's unloaded latency (what is left then is unfinished)."""
        return self.duration + max(self.duration, 10.0 * fleet.nominal_latency_s)


def latencies(o: Outcome) -> tuple[np.ndarray, np.ndarray]:
    """[n] TTFT and TPOT in ms; inf where the request did not get there (TPOT 0 for one-token outputs)."""
    r = o.requests
    ttft = np.where(np.isnan(o.first_token), np.inf, (o.first_token - r.arrival) * 1e3)
    tokens = np.maximum(1, r.output_len - 1)
    tpot = np.where(r.output_len <= 1, 0.0, (o.finish - o.first_token) * 1e3 / tokens)
    tpot = np.where(np.isnan(o.finish), np.inf, tpot)
    return ttft, tpot


def _pcts(x: np.ndarray) -> dict[str, float | None]:
    out: dict[str, float | None] = {key: None for key in (*(f"p{p}" for p in PERCENTILES), "mean")}
    if x.size == 0:
        return out
    for p in PERCENTILES:
        v = float(np.percentile(x, p, method="inverted_cdf"))
        out[f"p{p}"] = round(v, 3) if math.isfinite(v) else None
    finite = x[np.isfinite(x)]
    out["mean"] = round(float(finite.mean()), 3) if finite.size == x.size else None
    return out


def good(o: Outcome, slo: Slo) -> np.ndarray:
    """[n] True where the request finished within both SLOs."""
    ttft, tpot = latencies(o)
    ok = np.isfinite(ttft) & np.isfinite(tpot)
    if slo.ttft_ms is not None:
        ok &= ttft <= slo.ttft_ms
    if slo.tpot_ms is not None:
        ok &= tpot <= slo.tpot_ms
    return ok


def served_span(o: Outcome, fleet: Fleet, duration: float) -> float:
    """The time (s) the finished requests took to serve: the arrival window, or, when the system ran on
    to drain a backlog, until the last finish less one unloaded request's latency. Rates divide by it:
    in a stable run it is the window (arrivals = completions), in an overloaded one it turns counts
    into the service rate instead of crediting the drain to the window."""
    done = o.finish[~np.isnan(o.finish)]
    if done.size == 0:
        return duration
    return max(duration, float(done.max()) - fleet.nominal_latency_s)


def summarise(o: Outcome, fleet: Fleet, settings: Settings, slo: Slo) -> dict:
    """The JSON-ready report of one run (rates per second of the served span, see `served_span`)."""
    r = o.requests
    d = settings.duration
    span = served_span(o, fleet, d)
    ttft, tpot = latencies(o)
    finished = ~np.isnan(o.finish)
    ok = good(o, slo)
    in_window = o.step_end <= d
    decode_devices = sum(i.devices for i in fleet.decode)
    stride = max(1, len(o.samples["t"]) // QUEUE_POINTS)
    queues = {k: [round(v, 3) for v in vs[::stride]] for k, vs in o.samples.items()}
    return {
        "requests": len(r),
        "finished": int(finished.sum()),
        "unfinished": int((~finished).sum()),
        "duration_s": round(d, 6),
        "offered_rate": round(len(r) / d, 4),
        "span_s": round(span, 3),
        "ttft_ms": _pcts(ttft),
        "tpot_ms": _pcts(tpot),
        "throughput": {
            "requests_per_s": round(float(finished.sum()) / span, 4),
            "output_tokens_per_s": round(float(r.output_len[finished].sum()) / span, 2),
            "decode_tokens_per_s_per_device": round(float(o.step_tokens[in_window].sum()) / d / decode_devices, 3),
        },
        "goodput": {
            "requests_per_s": round(float(ok.sum()) / span, 4),
            "requests_per_s_per_device": round(float(ok.sum()) / span / fleet.devices, 6),
            "share": round(float(ok.mean()), 4) if len(r) else None,
        },
        "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms},
        "queues": {
            "max": {k: max(v, default=0) for k, v in o.samples.items() if k != "t"},
            "series": queues,
        },
        "devices": fleet.devices,
        "prefill_batches": o.prefill_batches,
        "decode_steps": int(o.step_end.size),
        "end_s": round(o.end, 3),
    }


def simulate(fleet: Fleet, arrivals: ArrivalSpec, lengths: LengthSpec, settings: Settings, slo: Slo) -> dict:
    """Generate the stream, run it and summarise it (a trace shorter than the duration sets the window)."""
    if arrivals.span < settings.duration:
        settings = dataclasses.replace(settings, duration=arrivals.span)
    reqs = generate(arrivals, lengths, settings.duration, settings.seed)
    if len(reqs) == 0:
        raise InputError(f"no request arrives in {settings.duration:g} s at {arrivals.text}; raise the rate or "
                         "--duration")
    o = run(fleet, reqs, seed=settings.seed, horizon=settings.horizon(fleet),
            sample_every=max(0.01, settings.duration / QUEUE_POINTS), chunked=settings.chunked)
    return summarise(o, fleet, settings, slo) | {"outcome": o}


def meets(report: dict, slo: Slo) -> bool:
    """p90 TTFT and p90 TPOT within the SLOs (and finite: every 9 of 10 requests finished), and the run
    keeps up with the offered rate (KEEPS_UP)."""
    if report["throughput"]["requests_per_s"] < KEEPS_UP * report["offered_rate"]:
        return False
    for key, limit in (("ttft_ms", slo.ttft_ms), ("tpot_ms", slo.tpot_ms)):
        p90 = report[key]["p90"]
        if p90 is None or (limit is not None and p90 > limit):
            return False
    return True


def sweep(fleet: Fleet, arrivals: ArrivalSpec, lengths: LengthSpec, settings: Settings, slo: Slo,
          rates: list[float] | None = None) -> dict:
    """Goodput against rate, and the highest rate whose p90 TTFT and TPOT meet the SLO.

    Step 1: run every rate (default: SWEEP_FRACTIONS of the design rate). Step 2: between the last
    rate that meets the SLO and the first that does not, bisect BISECT_STEPS times.
    """
    design = fleet.design_rate
    grid = sorted(rates) if rates else [round(f * design, 6) for f in SWEEP_FRACTIONS]
    points = []

    def point(rate: float) -> dict:
        rep = simulate(fleet, arrivals.at_rate(rate), lengths, settings, slo)
        row = {"rate": round(rate, 4), "goodput": rep["goodput"]["requests_per_s"],
               "goodput_per_device": rep["goodput"]["requests_per_s_per_device"],
               "p90_ttft_ms": rep["ttft_ms"]["p90"], "p90_tpot_ms": rep["tpot_ms"]["p90"],
               "throughput": rep["throughput"]["requests_per_s"], "meets_slo": meets(rep, slo)}
        points.append(row)
        return row

    rows = [point(rate) for rate in grid]
    ok_rates = [row["rate"] for row in rows if row["meets_slo"]]
    first_bad = next((row["rate"] for row in rows if not row["meets_slo"]), None)
    lo = max((x for x in ok_rates if first_bad is None or x < first_bad), default=None)
    if lo is not None and first_bad is not None:
        hi = first_bad
        for _ in range(BISECT_STEPS):
            mid = (lo + hi) / 2
            if point(mid)["meets_slo"]:
                lo = mid
            else:
                hi = mid
    points.sort(key=lambda row: row["rate"])
    return {"design_rate": round(design, 4), "points": points,
            "max_rate": round(lo, 4) if lo is not None else None,
            "max_rate_is_lower_bound": first_bad is None and lo is not None}
