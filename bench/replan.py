"""Re-planning the golden DeepSeek-V3 plan: moved experts and balance, replan vs solving from scratch.

    .venv/bin/python bench/replan.py                   # three scenarios, ~3 minutes on 2 cores
    .venv/bin/python bench/replan.py --scenarios server

Scenarios on plans/deepseek-v3.cloudmatrix384.json (decode: 2 x 88 devices x 4 slots):
  server     devices 8-15 fail (one whole server of decode-0)
  scattered  devices 3,17,40-45 fail (three servers of decode-0)
  shift      new decode loads (zipf:1.2 drawn with seed 1), no failure
Columns: slots whose surviving device must load a new expert ("moved") and max/mean device load
(average and worst layer) for `podplan replan`, for the from-scratch solve deployed as solved,
and for `planner.balance.balancer.balance(previous=...)` at the same slack, plus wall times. Both run the
one migration step (`planner.balance.migrate`: relabel, repair or sticky re-pack of the fresh layout),
so with the same loads and seed the two agree; the balancer row times it inside `podplan balance`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from planner.balance.balancer import balance
from planner.balance.loads import read_loads
from planner.ir.plan import load_plan
from planner.replan import DEFAULT_SLACK, replan

GOLDEN = Path(__file__).resolve().parents[1] / "plans" / "deepseek-v3.cloudmatrix384.json"
SCENARIOS = {
    "server": (tuple(range(8, 16)), None),
    "scattered": ((3, 17, 40, 41, 42, 43, 44, 45), None),
    "shift": ((), "zipf:1.2"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", nargs="*", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--time-limit", type=float, default=0.5, help="balancer seconds per sub-problem")
    parser.add_argument("--slack", type=float, default=DEFAULT_SLACK,
                        help=f"migration slack of both migration-aware methods (default {DEFAULT_SLACK})")
    args = parser.parse_args()
    from rich.console import Console
    from rich.table import Table

    plan = load_plan(GOLDEN)
    L, E = len(plan.model.moe_layers), plan.model.num_routed_experts
    table = Table(title="replan of the golden DeepSeek-V3 plan (decode-0: 88 devices x 4 slots)")
    for col in ("scenario", "method", "moved slots", "max/mean avg", "max/mean worst", "wall s"):
        table.add_column(col, justify="left" if col in ("scenario", "method") else "right")
    for name in args.scenarios:
        failed, spec = SCENARIOS[name]
        loads = read_loads(spec, layers=L, experts=E, seed=1) if spec else None
        t0 = time.perf_counter()
        result = replan(plan, failed=failed, loads=loads, phases=("decode",) if spec else None,
                        time_limit=args.time_limit, seed=0, slack=args.slack, estimate=False)
        wall = time.perf_counter() - t0
        change = next(c for c in result.changes if "decode-0" in c.instances)
        table.add_row(name, "podplan replan", f"{change.moved_slots:,}", f"{change.balance_after:.4f}",
                      f"{change.worst_after:.4f}", f"{wall:.1f}")
        table.add_row("", "from scratch", f"{change.scratch_moved:,}", f"{change.scratch_balance:.4f}",
                      f"{change.scratch_worst:.4f}", "")
        # the balancer's own migration mode on the same input
        old = plan.decode.experts[0]
        inst = plan.decode.instances[0]
        keep = [k for k, d in enumerate(inst.expert_devices) if d not in set(failed)]
        previous = np.array([lp.phy2log for lp in old.layers])
        t0 = time.perf_counter()
        own = balance(loads if loads is not None else read_loads("zipf:1.2", layers=L, experts=E, seed=0),
                      len(keep), old.slots_per_device, previous=previous, previous_devices=keep,
                      migration_slack=args.slack, time_limit=args.time_limit, seed=0)
        table.add_row("", "balance(previous=)", f"{int(own.moved_slots.sum()):,}",
                      f"{float(own.max_over_mean.mean()):.4f}", f"{float(own.max_over_mean.max()):.4f}",
                      f"{time.perf_counter() - t0:.1f}")
    Console(width=160).print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
