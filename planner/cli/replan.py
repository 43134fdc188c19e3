"""`podplan replan PLAN.json [--failed-devices IDS] [--loads NEW] -o NEW.json`: re-solve after failures or new loads."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from costmodels.errors import InputError
from planner.cli.args import MAX_SEED, at_least, at_most, finite, output_file, single_hardware
from planner.cli.console import stderr_console, stdout_console
from planner.cli.defaults import REPLAN_SLACK as DEFAULT_SLACK
from planner.cli.progress import Progress

if TYPE_CHECKING:
    from planner.replan import ReplanResult

# An hour per sub-problem: a recorded limit above this is not one a compile ran with.
MAX_TIME_LIMIT_S = 3600.0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "replan",
        help="re-solve expert placement after device failures or a load shift, moving few experts",
        description=(
            "Drop failed devices from their instances (every expert keeps a replica) and/or re-balance for "
            "new loads, staying close to the old placement; predictions are re-estimated, the rest of the "
            "plan is kept. Compare with `podplan diff OLD NEW`."
        ),
    )
    p.add_argument("plan", metavar="PLAN.json", help="plan written by `podplan compile`")
    p.add_argument("--failed-devices", metavar="IDS", help="failed device ids, e.g. 3,17,40-47")
    p.add_argument("--loads", metavar="NEW",
                   help="new expert loads (.npy/.json/.csv/.pt, SGLang/vLLM dumps, or zipf:S/hot:K/uniform); "
                        "default: the loads the plan was compiled with")
    p.add_argument("--phase", choices=("prefill", "decode"), action="append",
                   help="phase the new --loads apply to (repeatable; default: every phase)")
    p.add_argument("--time-limit", type=float, metavar="S",
                   help="balancer seconds per sub-problem (default: the plan's compile setting, else 0.5)")
    p.add_argument("--seed", type=int, help="solver seed (default: the plan's seed)")
    p.add_argument("--migration-slack", type=float, default=DEFAULT_SLACK, metavar="F",
                   help=f"accept a max load this fraction above the from-scratch solve to move fewer experts "
                        f"(default {DEFAULT_SLACK})")
    p.add_argument("--workers", type=int, metavar="W", help="processes solving layers (default: one per core)")
    p.add_argument("--model-config", metavar="PATH",
                   help="config.json of a plan compiled from your own config, to re-estimate its predictions "
                        "(checked against the plan's digest; paths a plan records are never opened)")
    p.add_argument("-o", "--output", required=True, metavar="NEW.json", help="where to write the new plan")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from planner.ir.plan import load_plan, write_plan
    from planner.replan import parse_device_ids, plan_loads, replan

    out = output_file("replan", args.output, "plan.json")
    if not args.failed_devices and not args.loads:
        raise InputError("replan: nothing to do; give --failed-devices IDS and/or --loads NEW")
    at_least("replan", "--workers", args.workers, 1)
    at_least("replan", "--seed", args.seed, 0)
    at_most("replan", "--seed", args.seed, MAX_SEED)
    finite("replan", "--time-limit", args.time_limit)
    finite("replan", "--migration-slack", args.migration_slack)
    plan = load_plan(args.plan)
    single_hardware("replan", plan, args.plan, "re-placement re-scores instances on one kind of hardware")
    if args.model_config is not None:
        from planner.frontend.zoo import load_source

        if load_source(args.model_config).digest() != plan.model.config_sha256:
            raise InputError(f"replan: --model-config {args.model_config}: its digest is not the plan's "
                             "model.config_sha256; pass the config the plan was compiled from")
    failed = parse_device_ids(args.failed_devices, plan.topology.num_devices, plan.topology.name) \
        if args.failed_devices else ()
    seed = plan.provenance.seed if args.seed is None else args.seed
    time_limit = args.time_limit
    if time_limit is None:
        time_limit = _recorded_time_limit(plan.provenance.options.get("time_limit", 0.5))
    loads = plan_loads(plan, args.loads, seed) if args.loads else None
    err = stderr_console()
    what = " and ".join(x for x in (f"{len(failed)} failed devices" if failed else "",
                                    f"new loads {args.loads}" if args.loads else "") if x)
    with Progress("replan") as progress:
        progress.step(f"re-planning {args.plan} for {what}")
        result = replan(plan, failed=failed, loads=loads, phases=args.phase, time_limit=time_limit, seed=seed,
                        slack=args.migration_slack, workers=args.workers, loads_spec=args.loads,
                        model_config=args.model_config)
    write_plan(result.plan, out)
    for note in result.notes:
        err.print(f"podplan replan: note: {note}", soft_wrap=True, markup=False)
    _print(result, args.plan, out)
    return 0


def _recorded_time_limit(value: object) -> float:
    """The compile's --time-limit as the plan records it; a plan is data from someone else, so checked."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_TIME_LIMIT_S:
        raise InputError(f"replan: plan.provenance.options.time_limit: {value!r} is not a time limit in "
                         f"(0, {MAX_TIME_LIMIT_S:g}] seconds; pass --time-limit S")
    return float(value)


def _print(result: ReplanResult, old: str, out: Path) -> None:
    from rich.table import Table

    table = Table(title=f"podplan replan: {old} -> {out}")
    for col in ("phase", "instances", "expert devices", "moved slots", "migration", "max/mean before",
                "max/mean after", "from scratch", "repaired layers"):
        table.add_column(col, justify="left" if col in ("phase", "instances") else "right")
    for c in result.changes:
        table.add_row(
            c.phase, ", ".join(c.instances), f"{c.devices_before} -> {c.devices_after} x {c.slots_per_device} slots",
            f"{c.moved_slots:,} of {c.devices_after * c.slots_per_device * c.layers:,}",
            f"{c.migration_bytes / 1e9:,.1f} GB",
            f"{c.balance_before:.4f} (worst {c.worst_before:.4f})",
            f"{c.balance_after:.4f} (worst {c.worst_after:.4f})",
            f"{c.scratch_balance:.4f}, {c.scratch_moved:,} moved",
            f"{c.repaired_layers}/{c.layers}",
        )
    console = stdout_console()
    console.print(table)
    plan = result.plan
    for name, phase in plan.phases.items():
        p = phase.predictions
        lat = f"TPOT {p.tpot_ms:.1f} ms" if p.tpot_ms is not None else f"TTFT {p.ttft_ms:.0f} ms"
        console.print(f"{name}: {len(phase.instances)} instances on {len(phase.devices)} devices, {lat}, "
                      f"{p.throughput_per_device:,.0f} tokens/s per device")
    if result.failed:
        from planner.ir.plan import device_ranges

        console.print(f"failed devices {device_ranges(result.failed)} removed; every expert keeps a replica")
    console.print(f"wrote {out}; compare with `podplan diff {old} {out}`")
