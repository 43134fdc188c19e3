"""`podplan diff OLD.json NEW.json [--json | --markdown] [--fail-on SPEC]`: semantic diff with CI exit codes."""

from __future__ import annotations

import argparse
import json
import sys

from costmodels.errors import InputError
from planner.ir.plan import load_plan
from planner.views.diff import (
    DEFAULT_FAIL_ON,
    check,
    diff_plans,
    parse_fail_on,
    render_markdown,
    render_text,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diff", help="semantic diff of two plans; exit 0 ok, 1 regression, 2 bad input")
    p.add_argument("old", metavar="OLD.json")
    p.add_argument("new", metavar="NEW.json")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the diff and the regressions as JSON")
    out.add_argument("--markdown", action="store_true", help="print a Markdown report fit for a CI comment")
    p.add_argument("--fail-on", metavar="SPEC", default=None,
                   help=f"regression rules, overriding the defaults ({DEFAULT_FAIL_ON.replace('%', '%%')}) metric by metric: "
                        "[prefill.|decode.]METRIC:LIMIT, e.g. 'throughput:-0.5%%,tpot:+2%%,moved-experts:100,"
                        "migration:10GB,balance:+5%%,memory:+10%%,ttft:off'; 'none' drops the defaults")
    p.add_argument("--allow-incomparable", action="store_true",
                   help="compare plans of another model or topology (predictions only: their device and expert ids "
                        "do not correspond), and do not count expert placements that cannot be compared as a "
                        "regression")
    p.add_argument("--rate", type=float, metavar="R",
                   help="also simulate both plans at R requests/s and report the goodput change (docs/simulate.md)")
    p.add_argument("--goodput-drop", type=float, default=1.0, metavar="PCT",
                   help="with --rate: a goodput drop of more than PCT percent is a regression (default 1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    rules = parse_fail_on(args.fail_on)  # a bad spec fails before any file is read
    _check_rate(args)
    old, new = load_plan(args.old), load_plan(args.new)
    diff = diff_plans(old, new)
    if diff["unlike"] and not args.allow_incomparable:
        raise InputError(f"{args.old} and {args.new} are unlike plans ({', '.join(diff['unlike'])}): their "
                         "device and expert ids do not correspond, so moves between them mean nothing; diff plans "
                         "of one model on one topology, or pass --allow-incomparable to compare predictions only")
    violations = check(diff, rules, allow_incomparable=args.allow_incomparable)
    if args.rate is not None:
        from planner.simulate.choose import goodput_change

        g = diff["goodput"] = goodput_change(old, new, args.rate)
        if g["delta_pct"] is not None and -g["delta_pct"] > args.goodput_drop + 1e-9:
            violations.append({"rule": f"goodput:-{args.goodput_drop:g}%", "phase": None, "metric": "goodput",
                               "message": f"goodput at {args.rate:g} req/s down {-g['delta_pct']:.2f}% "
                                          f"({g['old']['goodput']:g} -> {g['new']['goodput']:g} req/s)"})
    if args.json:
        doc = {"old": args.old, "new": args.new, "rules": [r.text for r in rules], "regressions": violations,
               "exit": 1 if violations else 0, **diff}
        sys.stdout.write(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    elif args.markdown:
        sys.stdout.write(render_markdown(diff, violations, rules, args.old, args.new))
    else:
        sys.stdout.write(render_text(diff, violations, rules, args.old, args.new))
    return 1 if violations else 0


def _check_rate(args: argparse.Namespace) -> None:
    from costmodels.errors import InputError

    if args.rate is not None and not 0 < args.rate < float("inf"):
        raise InputError(f"diff: --rate must be a finite number of requests/s > 0 (got {args.rate:g})")
    if not 0 <= args.goodput_drop < float("inf"):
        raise InputError(f"diff: --goodput-drop must be a percentage >= 0 (got {args.goodput_drop:g})")
