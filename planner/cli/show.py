"""`podplan show PLAN.json --format text|json|dot|html [-o FILE]`: inspect a plan."""

from __future__ import annotations

import argparse
import sys

from planner.cli.console import stdout_console
from planner.ir.fileio import check_output_path, write_atomic
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


def run(args: argparse.Namespace) -> int:
    if args.output:
        check_output_path(args.output, flag="-o")
    plan = load_plan(args.plan)
    if args.format == "text" and not args.output:
        from planner.views.text import print_summary

        print_summary(plan, stdout_console())
        return 0
    text = render(plan, args.format)  # everything rendered before anything is written
    if args.output:
        write_atomic(args.output, text)
        print(f"wrote {args.output} ({args.format}, {len(text.encode())} bytes)", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
