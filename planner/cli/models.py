"""`podplan models`: the bundled model zoo with parameter counts and MoE shape."""

from __future__ import annotations

import argparse
import json

from planner.frontend import zoo
from planner.cli.console import stdout_console
from planner.frontend.shape import model_row, shape_of
from planner.views.common import human_count


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list bundled models: parameters, layers, experts, top-k")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    rows = []
    for name in zoo.bundled_names():
        row = model_row(shape_of(name))
        row["source"] = zoo.BUNDLED[name][0]
        row["description"] = zoo.BUNDLED[name][1]
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
        return 0
    from rich.table import Table

    table = Table(title="podplan model zoo (params counted on the transformers classes, meta device)")
    for col in ("model", "total", "active", "layers", "MoE layers", "routed", "shared", "top-k", "attention"):
        table.add_column(col, justify="left" if col in ("model", "attention") else "right")
    for r in rows:
        table.add_row(
            r["name"], human_count(r["params_total"]), human_count(r["params_active"]), str(r["num_layers"]),
            str(r["num_moe_layers"]), str(r["num_routed_experts"]), str(r["num_shared_experts"]),
            str(r["top_k"]), r["attention"],
        )
    stdout_console().print(table)
    return 0

