"""`podplan balance`: replicate and place experts for measured or generated loads."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

from costmodels.errors import InputError
from planner.cli.args import MAX_SEED, at_least, at_most, finite, output_file
from planner.cli.console import stdout_console
from planner.cli.progress import Progress
from planner.cli.defaults import BALANCE_ALGORITHMS as ALGORITHMS
from planner.cli.defaults import BALANCE_MIGRATION_SLACK as DEFAULT_MIGRATION_SLACK
from planner.cli.defaults import BALANCE_SPLITS as SPLITS
from planner.cli.defaults import BALANCE_TIME_LIMIT as DEFAULT_TIME_LIMIT
from planner.cli.defaults import LOAD_GENERATORS as GENERATORS
from planner.ir.fileio import write_atomic

if TYPE_CHECKING:
    from planner.balance.balancer import BalanceResult

# Above this many layers the table shows a summary instead of one row per layer.
_TABLE_ROWS = 16


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "balance",
        help="replicate and place experts on devices: ILP-backed search vs DeepSeek EPLB, with a bound",
        description=(
            "Balance expert loads over D devices x S slots per layer. LOADS is a .npy/.json/.csv/.pt "
            f"[layers x experts] matrix (SGLang / vLLM dumps too) or a generator: {', '.join(GENERATORS)} "
            "(with --layers/--experts)."
        ),
    )
    p.add_argument("loads", metavar="LOADS", help="loads file or generator spec (uniform, zipf:S, hot:K)")
    p.add_argument("--devices", type=int, required=True, metavar="D", help="devices serving the experts")
    p.add_argument("--slots-per-device", type=int, required=True, metavar="S", help="expert slots per device")
    p.add_argument("--nodes", type=int, default=1, metavar="N", help="nodes (device d is on node d // (D/N))")
    p.add_argument("--groups", type=int, default=1, metavar="G",
                   help="expert groups; G %% N == 0 and G > 1 keeps each group on one node")
    p.add_argument("--algorithm", choices=ALGORITHMS, default="ilp", help="ilp (default) or the eplb baseline")
    p.add_argument("--split", choices=SPLITS, default="equal",
                   help="equal: tokens split evenly over replicas; weighted: per-slot shares (LP)")
    p.add_argument("--previous", metavar="OLD.json", help="previous layout (phy2log) to stay close to")
    p.add_argument("--migration-slack", type=float, default=DEFAULT_MIGRATION_SLACK, metavar="F",
                   help=f"with --previous: accept a max load this fraction above the best (default {DEFAULT_MIGRATION_SLACK})")
    p.add_argument("--time-limit", type=float, default=DEFAULT_TIME_LIMIT, metavar="SEC",
                   help=f"deterministic CP-SAT seconds per sub-problem (default {DEFAULT_TIME_LIMIT})")
    p.add_argument("--seed", type=int, default=0, help="seed of generators and solvers (default 0)")
    p.add_argument("--layers", type=int, metavar="L", help="layers (generators; checked against files)")
    p.add_argument("--experts", type=int, metavar="E", help="experts per layer (generators; checked against files)")
    p.add_argument("--workers", type=int, metavar="W", help="processes solving layers (default: one per core from 8 layers on)")
    p.add_argument("--timing", action="store_true", help="add wall time under 'timing' (makes OUT.json vary)")
    p.add_argument("--per-layer", action="store_true", help="print one table row per layer")
    p.add_argument("-o", "--output", required=True, metavar="OUT.json", help="where to write the result")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from planner.balance.balancer import balance  # ortools and numpy: only when balancing
    from planner.balance.loads import read_loads

    out = output_file("balance", args.output, "balance.json")
    for flag, value in (("--workers", args.workers), ("--layers", args.layers), ("--experts", args.experts)):
        at_least("balance", flag, value, 1)
    at_least("balance", "--seed", args.seed, 0)
    at_most("balance", "--seed", args.seed, MAX_SEED)
    finite("balance", "--time-limit", args.time_limit)
    finite("balance", "--migration-slack", args.migration_slack)
    loads = read_loads(args.loads, layers=args.layers, experts=args.experts, seed=args.seed)
    previous = _read_previous(args.previous) if args.previous else None
    with Progress("balance") as progress:
        progress.step(f"balancing {loads.shape[0]} layers x {loads.shape[1]} experts over {args.devices} devices "
                      f"x {args.slots_per_device} slots ({args.algorithm})")
        result = balance(
            loads, args.devices, args.slots_per_device, nodes=args.nodes, groups=args.groups,
            algorithm=args.algorithm, split=args.split, previous=previous, migration_slack=args.migration_slack,
            time_limit=args.time_limit, seed=args.seed, workers=args.workers,
        )
    text = json.dumps(result.to_dict(timing=args.timing), sort_keys=True, separators=(",", ":")) + "\n"
    write_atomic(out, text)
    _print(result, out, args.per_layer)
    return 0


def _read_previous(path: str) -> Any:
    """A previous layout: our OUT.json (phy2log), an SGLang/vLLM map, a plain [L, R] list or .npy."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"balance: previous layout {path}: no such file; pass an earlier OUT.json")
    try:
        if p.suffix.lower() == ".npy":
            import numpy as np

            return np.load(p, allow_pickle=False)
        obj = json.loads(p.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"balance: previous layout {path}: cannot read it ({str(exc).splitlines()[0]})") from None
    if isinstance(obj, dict):
        for key in ("phy2log", "physical_to_logical_map"):
            if key in obj:
                return obj[key]
        raise InputError(f"balance: previous layout {path}: no 'phy2log' or 'physical_to_logical_map' key")
    return obj


def _print(result: BalanceResult, out: Path, per_layer: bool) -> None:
    import numpy as np
    from rich.table import Table

    totals = result.totals()
    means = result.device_loads.mean(axis=1)
    title = (
        f"podplan balance: {result.algorithm}/{result.split}, {result.layers} layers x {result.experts} experts "
        f"on {result.devices} devices x {result.slots_per_device} slots ({result.mode})"
    )
    table = Table(title=title)
    for col in ("layer", "max/mean", "EPLB max/mean", "bound/mean", "gap", "status", "source"):
        table.add_column(col, justify="left" if col in ("layer", "status", "source") else "right")
    if result.moved_slots is not None:
        table.add_column("moved", justify="right")
    rows = range(result.layers) if per_layer or result.layers <= _TABLE_ROWS else []
    for layer in rows:
        cells = [
            str(layer), f"{result.max_over_mean[layer]:.4f}", f"{result.eplb_max_over_mean[layer]:.4f}",
            f"{result.bound[layer] / means[layer] if means[layer] > 0 else 1.0:.4f}",
            f"{100 * result.gap[layer]:.2f}%", result.status[layer], result.source[layer],
        ]
        if result.moved_slots is not None:
            cells.append(str(int(result.moved_slots[layer])))
        table.add_row(*cells)
    if not rows:
        worst = int(np.argmax(result.max_over_mean))
        cells = [
            f"avg of {result.layers}", f"{totals['max_over_mean_avg']:.4f}", f"{totals['eplb_max_over_mean_avg']:.4f}",
            f"{totals['bound_over_mean_avg']:.4f}", f"{100 * float(result.gap.mean()):.2f}%",
            f"{totals['layers_optimal']}/{result.layers} optimal", ", ".join(sorted(set(result.source))),
        ]
        worst_cells = [
            f"worst (layer {worst})", f"{result.max_over_mean[worst]:.4f}",
            f"{totals['eplb_max_over_mean_worst']:.4f}", "", f"{100 * totals['gap_worst']:.2f}%", "", "",
        ]
        if result.moved_slots is not None:
            cells.append(str(totals["moved_slots"]))
            worst_cells.append("")
        table.add_row(*cells)
        table.add_row(*worst_cells)
    console = stdout_console()
    console.print(table)
    dup = totals["eplb_duplicate_devices"]
    note = f"; EPLB put two replicas of one expert on one device {dup} times" if dup else ""
    console.print(f"wrote {out} in {result.wall_time:.2f} s{note}")
