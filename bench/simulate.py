"""Wall time of `podplan simulate` on the golden DeepSeek-V3 / cloudmatrix384 plan at its design rate.

    .venv/bin/python bench/simulate.py                 # 10 simulated minutes, Poisson at the design rate
    .venv/bin/python bench/simulate.py --duration 60 --rate-fraction 1.2

The target (issue "podplan simulate"): a 10-minute run finishes in at most 30 s on the 2-core
machine. Printed: the time to build the fleet (model shape, cost-model estimates) and to simulate,
the number of cost-model calls behind the step-time caches, and the run's headline numbers.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

GOLDEN = Path(__file__).resolve().parents[1] / "plans" / "deepseek-v3.cloudmatrix384.json"
BUDGET_S = 30.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600.0, help="simulated seconds of arrivals (default 600)")
    parser.add_argument("--rate-fraction", type=float, default=1.0, help="rate as a fraction of the design rate")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    t0 = time.perf_counter()
    from planner.ir.plan import load_plan
    from planner.simulate.fleet import fleet_of_plan
    from planner.simulate.report import Settings, Slo, simulate
    from planner.simulate.workload import ArrivalSpec, LengthSpec

    plan = load_plan(GOLDEN)
    fleet = fleet_of_plan(plan)
    rate = fleet.design_rate * args.rate_fraction
    t1 = time.perf_counter()
    wl = plan.workload
    rep = simulate(fleet, ArrivalSpec("poisson", rate), LengthSpec(wl.input_len, wl.output_len),
                   Settings(duration=args.duration, seed=args.seed), Slo(wl.ttft_slo_ms, wl.tpot_slo_ms))
    t2 = time.perf_counter()
    calls = sum(len(i.cache) for i in fleet.decode) + sum(len(i.cache) for i in fleet.prefill)
    total = t2 - t0
    print(f"{fleet.name}: {len(fleet.prefill)} prefill + {len(fleet.decode)} decode instances, design rate "
          f"{fleet.design_rate:.1f} req/s")
    print(f"simulated {args.duration:g} s at {rate:.1f} req/s: {rep['requests']:,} requests, "
          f"{rep['decode_steps']:,} decode steps, {rep['prefill_batches']:,} prefill batches, "
          f"{calls} cost-model calls (cached step times)")
    print(f"TTFT p50/p90/p99 {rep['ttft_ms']['p50']}/{rep['ttft_ms']['p90']}/{rep['ttft_ms']['p99']} ms; "
          f"TPOT p50/p90/p99 {rep['tpot_ms']['p50']}/{rep['tpot_ms']['p90']}/{rep['tpot_ms']['p99']} ms; "
          f"goodput {rep['goodput']['requests_per_s']:.1f} req/s")
    print(f"wall: imports + plan + fleet {t1 - t0:.1f} s, simulation {t2 - t1:.1f} s, total {total:.1f} s "
          f"(budget {BUDGET_S:g} s: {'ok' if total <= BUDGET_S else 'OVER'})")
    return 0 if total <= BUDGET_S else 1


if __name__ == "__main__":
    raise SystemExit(main())
