"""`podplan trace MODEL`: trace the transformers model on meta and print the per-layer table."""

from __future__ import annotations

import argparse
import json
import sys
import time

from costmodels.errors import InputError
from passes.annotate import annotate
from passes.context import PassContext
from planner.cli.console import stdout_console
from planner.frontend.trace import trace
from planner.frontend.report import human_count, layer_rows, model_row
from planner.frontend.shape import shape_from_traced


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trace", help="trace a model with torch.fx and print per-layer params, FLOPs and cut bytes")
    p.add_argument("model", help="bundled name (see `podplan models`), a config.json, or a directory holding one")
    p.add_argument("--batch", type=int, default=1, help="sequences in the traced signature (default 1)")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence in the traced signature (default 128)")
    p.add_argument("--json", action="store_true", help="print a JSON document instead of a table")
    p.add_argument("--stages", action="store_true",
                   help="run the stage-split pass pipeline and print the stage table (params, FLOPs, cut bytes)")
    p.add_argument("--dump-after", metavar="PASS",
                   help="print the graph after PASS of the stage-split pipeline (kv-cache, annotate, classify, split, ...)")
    p.set_defaults(func=run)


def build_trace_document(model: str, batch: int, seq: int) -> tuple[dict, object, object]:
    """Trace + annotate; return the JSON document, the annotated graph and the ModelShape."""
    traced = trace(model)
    shape = shape_from_traced(traced)
    gm = annotate(traced.gm, PassContext(shape=shape, batch=batch, seq=seq))
    doc = model_row(shape)
    doc.update(
        model=shape.name,
        signature={"batch": batch, "seq": seq},
        config_sha256=traced.source.digest(),
        layers=layer_rows(gm, shape),
    )
    return doc, gm, shape


def run(args: argparse.Namespace) -> int:
    if args.batch <= 0 or args.seq <= 0:
        raise InputError(f"--batch and --seq must be positive (got {args.batch}, {args.seq})")
    if args.stages or args.dump_after:
        return _run_stages(args)
    t0 = time.perf_counter()
    doc, gm, shape = build_trace_document(args.model, args.batch, args.seq)
    elapsed = time.perf_counter() - t0
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    _print_table(doc, elapsed)
    return 0


def _print_table(doc: dict, elapsed: float) -> None:
    from rich.table import Table

    console = stdout_console()
    table = Table(
        title=(
            f"{doc['model']}: {doc['num_layers']} layers ({doc['num_moe_layers']} MoE), "
            f"{doc['num_routed_experts']} routed + {doc['num_shared_experts']} shared experts, top-{doc['top_k']}, "
            f"{human_count(doc['params_total'])} total / {human_count(doc['params_active'])} active"
        )
    )
    for col in ("layer", "kind", "roles", "params", "FLOPs/token", "attn->MoE B/token", "MoE->attn B/token"):
        table.add_column(col, justify="left" if col in ("kind", "roles") else "right")
    for row in _collapse(doc["layers"]):
        table.add_row(
            row["span"], row["kind"], ", ".join(row["roles"]), human_count(row["params"]),
            human_count(row["flops_per_token"]), f"{row['a2e_bytes_per_token']:,.0f}", f"{row['e2a_bytes_per_token']:,.0f}",
        )
    console.print(table)
    print(f"traced + annotated in {elapsed:.1f} s (batch {doc['signature']['batch']}, seq {doc['signature']['seq']})", file=sys.stderr)


def _collapse(layers: list[dict]) -> list[dict]:
    """Merge runs of identical consecutive layers into one row (`3-60`)."""
    keys = ("kind", "roles", "params", "flops_per_token", "a2e_bytes_per_token", "e2a_bytes_per_token")
    out: list[dict] = []
    for row in layers:
        if out and all(out[-1][k] == row[k] for k in keys):
            out[-1]["last"] = row["layer"]
        else:
            out.append(dict(row, first=row["layer"], last=row["layer"]))
    for row in out:
        row["span"] = str(row["first"]) if row["first"] == row["last"] else f"{row['first']}-{row['last']}"
    return out


# --- `--stages` / `--dump-after`: the stage-split pipeline (planner/stages.py) ------------------------


def _run_stages(args: argparse.Namespace) -> int:
    from passes import get_pass
    from planner.frontend.stages import compile_stages, stage_document

    if args.dump_after:
        get_pass(args.dump_after)  # unknown names fail before the (slow) trace
        if args.json:
            raise InputError("--dump-after prints a graph, not JSON; drop --json (or use --stages --json alone)")
    t0 = time.perf_counter()
    traced = trace(args.model)
    shape = shape_from_traced(traced)
    program = compile_stages(traced, shape, args.batch, args.seq, dump_after=args.dump_after, dump=print)
    elapsed = time.perf_counter() - t0
    if not args.stages:
        return 0
    doc = stage_document(program)
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    _print_stage_table(doc)
    timings = ", ".join(f"{r.name} {r.seconds:.2f}" for r in program.records)
    print(f"traced + compiled in {elapsed:.1f} s (passes, s: {timings})", file=sys.stderr)
    return 0


def _print_stage_table(doc: dict) -> None:
    from rich.table import Table

    from planner.frontend.stages import collapse_rows

    counts = ", ".join(f"{n} {kind}" for kind, n in doc["stage_counts"].items())
    sig = doc["signature"]
    table = Table(title=f"{doc['model']}: {sum(doc['stage_counts'].values())} stages ({counts}); batch {sig['batch']}, seq {sig['seq']}")
    for col in ("layer", "kind", "params", "FLOPs/token", "cut in B/token", "cut out B/token", "in (int8)", "out (int8)"):
        table.add_column(col, justify="left" if col == "kind" else "right")
    for row in collapse_rows(doc["stages"]):
        table.add_row(
            row["span"], row["kind"], human_count(row["params"]), human_count(row["flops_per_token"]),
            f"{row['cut_in_bytes_per_token']:,.0f}", f"{row['cut_out_bytes_per_token']:,.0f}",
            f"{row['cut_in_bytes_per_token_int8']:,.0f}", f"{row['cut_out_bytes_per_token_int8']:,.0f}",
        )
    stdout_console().print(table)
    print(f"microbatch schedule (2 microbatches, lanes A/E): {_head(doc['microbatch_schedule'])}")


def _head(schedule: str, ticks: int = 8) -> str:
    parts = schedule.split(" | ")
    return " | ".join(parts[:ticks]) + (f" | ... ({len(parts)} ticks)" if len(parts) > ticks else "")
