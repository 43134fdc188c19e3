"""`podplan models`: the bundled model zoo with parameter counts and MoE shape; `--families`: every
Mixture-of-Experts family the installed transformers ships, traced or refused (with the reason).

Counting parameters builds every model on the meta device (seconds per model), so the rows are kept
in models.json beside this file, each with the digest of the config it was counted from; a row whose
config changed is counted again. `python -m planner.cli.models --write` refreshes the file and
tests/planner/test_cli_startup.py checks it against a fresh count.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from importlib import resources

from planner.cli.console import stdout_console
from planner.frontend import zoo
from planner.views.common import human_count

TABLE = "models.json"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list bundled models: parameters, layers, experts, top-k")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.add_argument("--families", action="store_true",
                   help="list every MoE family of the installed transformers: traced (lossless) or refused, and why "
                        "(tried on a tiny config of each; cached per transformers and podplan version)")
    p.add_argument("--refresh", action="store_true", help="with --families: try every family again, ignoring the cache")
    p.set_defaults(func=run)


def counted_rows() -> dict[str, dict]:
    """Each bundled model's row counted now, on the transformers classes (slow: torch + meta models)."""
    from planner.frontend.shape import model_row, shape_of

    return {name: model_row(shape_of(name)) for name in zoo.bundled_names()}


def _stored() -> dict[str, dict]:
    try:
        return dict(json.loads(resources.files("planner.cli").joinpath(TABLE).read_text()))
    except (OSError, ValueError):  # missing or damaged: count everything again
        return {}


def zoo_rows() -> list[dict]:
    """One row per bundled model, from models.json where its config digest still matches."""
    stored = _stored()
    rows = []
    for name in zoo.bundled_names():
        digest = zoo.load_source(name).digest()
        entry = stored.get(name)
        if isinstance(entry, dict) and entry.get("config_sha256") == digest and isinstance(entry.get("row"), dict):
            row = dict(entry["row"])
        else:
            from planner.frontend.shape import model_row, shape_of

            row = model_row(shape_of(name))
        row["source"] = zoo.BUNDLED[name][0]
        row["description"] = zoo.BUNDLED[name][1]
        rows.append(row)
    return rows


def table_document() -> str:
    """models.json as `--write` writes it: counted rows keyed by model, with their config digests."""
    doc = {name: {"config_sha256": zoo.load_source(name).digest(), "row": row} for name, row in counted_rows().items()}
    return json.dumps(doc, indent=1, sort_keys=True) + "\n"


def run(args: argparse.Namespace) -> int:
    if args.families:
        return _families(args)
    rows = zoo_rows()
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


def _families(args: argparse.Namespace) -> int:
    from planner.frontend.families import reason_group, statuses
    from planner.frontend.trace import check_transformers

    check_transformers()
    rows = [s.row() for s in statuses(refresh=args.refresh)]
    for row in rows:
        row["group"] = reason_group(row["reason"]) if row["reason"] else ""
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
        return 0
    from rich.table import Table

    traced = sum(1 for r in rows if r["status"] == "traced")
    table = Table(title=f"MoE families of transformers: {len(rows)}, traced {traced}, refused {len(rows) - traced}")
    for col in ("family", "model_type", "status", "reason"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["family"], r["model_type"], r["status"], r["reason"])
    console = stdout_console()
    console.print(table)
    groups = Counter(r["group"] for r in rows if r["status"] == "refused")
    for group, n in groups.most_common():
        console.print(f"refused, {group}: {n}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m planner.cli.models --write   (recount the bundled models into models.json)")
    from pathlib import Path

    Path(__file__).with_name(TABLE).write_text(table_document())
