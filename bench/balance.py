"""Expert balancing at DeepSeek-V3 scale: EPLB vs podplan's balancer (equal, weighted) vs the bound.

    .venv/bin/python bench/balance.py                  # all cases, 58 layers x 256 experts
    .venv/bin/python bench/balance.py --layers 8       # quicker
    .venv/bin/python bench/balance.py --loads zipf:1.2 --shapes 320x2

Loads are the seeded generators of `planner.balance.loads` (multinomial draws of 65,536 routed
tokens per layer, a fresh expert ranking per layer). Shapes: EP32 prefill (32 devices x
9 slots), EP320 decode (320 x 1), 64 x 5 and the weak case 320 x 2. Columns give the
average and worst layer of max/mean device load, the average bound/mean, the worst gap
to the bound, and the wall time of all layers (`--workers` processes, default 2).
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import numpy as np

from planner.balance.balancer import DEFAULT_TIME_LIMIT, balance
from planner.balance.loads import generate_loads

LOADS = ("zipf:0.8", "zipf:1.2", "zipf:1.5", "hot:8")
SHAPES = ("32x9", "320x1", "64x5", "320x2")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=58, help="MoE layers (DeepSeek-V3: 58)")
    parser.add_argument("--experts", type=int, default=256, help="routed experts (DeepSeek-V3: 256)")
    parser.add_argument("--loads", nargs="*", default=list(LOADS), help=f"generators (default {' '.join(LOADS)})")
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), help="DEVICESxSLOTS (default all four)")
    parser.add_argument("--workers", type=int, default=2, help="processes solving layers (default 2)")
    parser.add_argument("--time-limit", type=float, default=DEFAULT_TIME_LIMIT, help="CP-SAT seconds per sub-problem")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print(f"{args.layers} layers x {args.experts} experts, {args.workers} workers, "
          f"{os.cpu_count()} CPUs visible, time limit {args.time_limit} s")
    head = (f"{'loads':<9}{'shape':>7} | {'EPLB avg/worst':>15}{'dup':>5} | {'equal avg/worst':>15}"
            f"{'gap':>7}{'s':>6}{'cpu':>6} | {'weighted avg/worst':>18}{'gap':>7}{'s':>6}{'cpu':>6} | {'bound':>7}")
    print(head)
    print("-" * len(head))
    cpu_total: dict[str, float] = {}
    wall_total: dict[str, float] = {}
    for spec in args.loads:
        loads = generate_loads(spec, args.layers, args.experts, seed=args.seed)
        for shape in args.shapes:
            devices, slots = (int(x) for x in shape.split("x"))
            row, cpu_case = {}, {}
            for name, algorithm, split in (("eplb", "eplb", "equal"), ("equal", "ilp", "equal"),
                                           ("weighted", "ilp", "weighted")):
                started, cpu = time.perf_counter(), _cpu()
                result = balance(loads, devices, slots, algorithm=algorithm, split=split,
                                 time_limit=args.time_limit, seed=args.seed, workers=args.workers)
                row[name] = (result, time.perf_counter() - started)
                cpu_case[name] = _cpu() - cpu
                cpu_total[name] = cpu_total.get(name, 0.0) + cpu_case[name]
                wall_total[name] = wall_total.get(name, 0.0) + row[name][1]
            eplb = row["eplb"][0]
            equal, t_equal = row["equal"]
            weighted, t_weighted = row["weighted"]
            means = loads.sum(axis=1) / devices
            bound = float(np.mean(weighted.bound / means))
            print(f"{spec:<9}{shape:>7} | {_pair(eplb.max_over_mean):>15}{int(eplb.eplb_duplicates.sum()):>5} | "
                  f"{_pair(equal.max_over_mean):>15}{_pct(equal.gap.max()):>7}{t_equal:>6.1f}{cpu_case['equal']:>6.1f} | "
                  f"{_pair(weighted.max_over_mean):>18}{_pct(weighted.gap.max()):>7}{t_weighted:>6.1f}"
                  f"{cpu_case['weighted']:>6.1f} | {bound:>7.4f}", flush=True)
    print("max/mean: largest device load over the mean (1.0 is perfect); gap: worst layer's "
          "max / bound - 1; dup: devices where EPLB put two replicas of one expert;\n"
          "s: wall seconds of all layers; cpu: CPU seconds of all layers, every worker process included")
    for name in ("eplb", "equal", "weighted"):
        cases = len(args.loads) * len(args.shapes)
        print(f"{name:>8}: {wall_total[name]:7.1f} s wall, {cpu_total[name]:7.1f} CPU s over {cases} cases "
              f"({cpu_total[name] / cases:.1f} CPU s a case of {args.layers} layers)")
    return 0


def _cpu() -> float:
    """CPU seconds of this process and its finished workers (contention-free effort)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _pair(values: np.ndarray) -> str:
    return f"{values.mean():.4f}/{values.max():.4f}"


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%"


if __name__ == "__main__":
    raise SystemExit(main())
