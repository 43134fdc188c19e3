"""`podplan show PLAN.json --format text|json|dot|html [-o FILE]`: inspect a plan."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from costmodels.errors import InputError
from planner.cli.console import stdout_console
from planner.ir.fileio import write_atomic
from planner.ir.plan import Plan, load_plan

FORMATS = ("text", "json", "dot", "html")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("show", help="inspect a plan: summary tables, canonical JSON, Graphviz DOT or one HTML page")
    p.add_argument("plan", metavar="PLAN.json", help="a plan written by `podplan compile`")
    p.add_argument("--format", choices=FORMATS, default="text",
                   help="text: summary tables (default); json: the canonical plan; dot: stage graph and device "
                        "assignment; html: self-contained page with device grids, bars and the Pareto frontier")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE (atomically) instead of stdout")
    p.set_defaults(func=run)


def render(plan: Plan, fmt: str) -> str:
    """The plan in one of FORMATS, as text."""
    if fmt == "json":
        return plan.to_json()
    if fmt == "dot":
        from planner.views.dot import render_dot

        return render_dot(plan)
    if fmt == "html":
        from planner.views.html import render_html

        return render_html(plan)
    from planner.views.text import text_of

    return text_of(plan)


def check_output(path: str) -> None:
    """Refuse an output path that cannot be written, before any work."""
    out = Path(path)
    if out.is_dir():
        raise InputError(f"-o {path}: is a directory; give a file path")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise InputError(f"-o {path}: {parent} is not a directory; give a file path in an existing folder")


def write_output(path: str, text: str) -> None:
    try:
        write_atomic(path, text)
    except OSError as exc:
        raise InputError(f"-o {path}: cannot write ({exc.strerror}); choose a writable path") from None


def run(args: argparse.Namespace) -> int:
    if args.output:
        check_output(args.output)
    plan = load_plan(args.plan)
    if args.format == "text" and not args.output:
        from planner.views.text import print_summary

        print_summary(plan, stdout_console())
        return 0
    text = render(plan, args.format)  # everything rendered before anything is written
    if args.output:
        write_output(args.output, text)
        print(f"wrote {args.output} ({args.format}, {len(text.encode())} bytes)", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
