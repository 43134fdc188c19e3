"""`podplan trace MODEL`: trace the transformers model on meta, run the stage-split pass pipeline and
print its stage facts per decoder layer (`--stages`: per stage, with the cuts and the schedule)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from typing import TYPE_CHECKING

from costmodels.errors import InputError
from planner.cli.console import stdout_console
from planner.cli.progress import Progress
from planner.views.common import LayerStages, human_count, layer_stages

if TYPE_CHECKING:
    from planner.compile import StageTable


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trace", help="trace a model, run the stage-split passes, print per-layer params, FLOPs and cut bytes")
    p.add_argument("model", help="bundled name (see `podplan models`), a config.json, or a directory holding one")
    p.add_argument("--batch", type=int, default=1, help="sequences in the traced signature (default 1)")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence in the traced signature (default 128)")
    p.add_argument("--json", action="store_true", help="print a JSON document instead of a table")
    p.add_argument("--stages", action="store_true",
                   help="run the stage-split pass pipeline and print the stage table (params, FLOPs, cut bytes)")
    p.add_argument("--dump-after", metavar="PASS",
                   help="print the graph after PASS of the stage-split pipeline (kv-cache, annotate, classify, split, ...)")
    p.set_defaults(func=run)


def build_trace_document(model: str, batch: int, seq: int) -> tuple[dict, StageTable]:
    """Trace + the stage-split pipeline; the JSON document (one row per decoder layer) and the stage table."""
    from planner.compile import stage_table  # torch and transformers: only when tracing
    from planner.frontend.shape import model_row, shape_from_traced
    from planner.frontend.trace import trace

    traced = trace(model)
    shape = shape_from_traced(traced)
    table = stage_table(traced, shape, batch, seq)
    doc = model_row(shape)
    doc.update(
        model=shape.name,
        signature={"batch": batch, "seq": seq},
        config_sha256=traced.source.digest(),
        passes=list(table.passes),
        layers=[layer_row(ls) for ls in layer_stages(table.stages)],
    )
    return doc, table


def layer_row(ls: LayerStages) -> dict:
    """One decoder layer summed from its stages: params, FLOPs, and bytes/token between its attention
    and FFN side; dispatch/combine are what its routed-experts stage takes in and sends (0: dense)."""
    routed = next((st for st in ls.stages if st.kind == "routed_experts"), None)
    return {
        "layer": ls.layer,
        "kind": ls.kind,
        "stages": [st.kind for st in ls.stages],
        "params": ls.params,
        "weight_bytes": sum(st.weight_bytes for st in ls.stages),
        "flops_per_token": round(ls.flops_per_token, 1),
        "attention_to_ffn_bytes_per_token": round(ls.attention_to_ffn, 1),
        "ffn_to_next_bytes_per_token": round(ls.ffn_to_next, 1),
        "attention_to_ffn_bytes_per_token_int8": round(ls.attention_to_ffn_int8, 1),
        "ffn_to_next_bytes_per_token_int8": round(ls.ffn_to_next_int8, 1),
        "dispatch_bytes_per_token": routed.bytes_in_per_token if routed else 0.0,
        "combine_bytes_per_token": routed.bytes_out_per_token if routed else 0.0,
    }


def run(args: argparse.Namespace) -> int:
    if args.batch <= 0 or args.seq <= 0:
        raise InputError(f"--batch and --seq must be positive (got {args.batch}, {args.seq})")
    if args.stages or args.dump_after:
        return _run_stages(args)
    t0 = time.perf_counter()
    with Progress("trace") as progress:
        progress.step(f"tracing {args.model} and running the stage-split pass pipeline")
        doc, table = build_trace_document(args.model, args.batch, args.seq)
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
    for col in ("layer", "kind", "stages", "params", "FLOPs/token", "attn->FFN B/token", "FFN->next B/token",
                "dispatch B/token", "combine B/token"):
        table.add_column(col, justify="left" if col in ("kind", "stages") else "right")
    for row in _collapse(doc["layers"]):
        table.add_row(
            row["span"], row["kind"], ", ".join(row["stages"][1:]), human_count(row["params"]),
            human_count(row["flops_per_token"]), f"{row['attention_to_ffn_bytes_per_token']:,.0f}",
            f"{row['ffn_to_next_bytes_per_token']:,.0f}", f"{row['dispatch_bytes_per_token']:,.0f}",
            f"{row['combine_bytes_per_token']:,.0f}",
        )
    console.print(table)
    sig = doc["signature"]
    print(f"traced + stage-split pipeline in {elapsed:.1f} s (batch {sig['batch']}, seq {sig['seq']}; "
          "`--stages` for the per-stage table)", file=sys.stderr)


def _collapse(layers: list[dict]) -> list[dict]:
    """Merge runs of identical consecutive layers into one row (`3-60`)."""
    out: list[dict] = []
    for row in layers:
        if out and all(out[-1][k] == row[k] for k in row if k != "layer"):
            out[-1]["last"] = row["layer"]
        else:
            out.append(dict(row, first=row["layer"], last=row["layer"]))
    for row in out:
        row["span"] = str(row["first"]) if row["first"] == row["last"] else f"{row['first']}-{row['last']}"
    return out


# --- `--stages` / `--dump-after`: the stage-split pipeline (planner/frontend/stages.py) ---------------


def _run_stages(args: argparse.Namespace) -> int:
    from passes import get_pass
    from planner.frontend.shape import shape_from_traced
    from planner.frontend.stages import compile_stages, stage_document
    from planner.frontend.trace import trace

    if args.dump_after:
        get_pass(args.dump_after)  # unknown names fail before the (slow) trace
        if args.json:
            raise InputError("--dump-after prints a graph, not JSON; drop --json (or use --stages --json alone)")
    t0 = time.perf_counter()
    with Progress("trace") as progress:
        progress.step(f"tracing {args.model}")
        traced = trace(args.model)
        shape = shape_from_traced(traced)
        progress.step("running the stage-split pass pipeline")
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
