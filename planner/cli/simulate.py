"""`podplan simulate PLAN.json --arrivals ... --lengths ...`: the plan under a request stream
(discrete-event simulation with the cost model's step times): latency percentiles, goodput, queues."""

from __future__ import annotations

import argparse
import json
import sys

from costmodels.errors import InputError
from planner.cli.args import MAX_SEED, at_least, at_most, finite, single_hardware

# Longest stream a run simulates (s): a day of traffic.
MAX_DURATION = 86400.0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="simulate a plan under a request stream: TTFT/TPOT percentiles, "
                                        "throughput, goodput, queues (docs/simulate.md)")
    p.add_argument("plan", metavar="PLAN.json", help="a plan written by `podplan compile`")
    p.add_argument("--arrivals", default="poisson:design", metavar="SPEC",
                   help="poisson:RATE, gamma:RATE:CV or a JSONL trace FILE; RATE in requests/s or 'design' "
                        "(the plan's design rate; default poisson:design)")
    p.add_argument("--lengths", metavar="SPEC",
                   help="fixed:IN:OUT or a JSONL trace FILE (default: the trace's own lengths with a trace "
                        "--arrivals, else the plan's workload lengths)")
    p.add_argument("--duration", type=float, default=120.0, help="seconds of arrivals (default 120); the run then "
                                                                  "drains")
    p.add_argument("--seed", type=int, default=0, help="seed of arrivals, sampled lengths and MTP (default 0)")
    p.add_argument("--ttft-ms", type=float, help="TTFT SLO for goodput (default: the plan's)")
    p.add_argument("--tpot-ms", type=float, help="TPOT SLO for goodput (default: the plan's)")
    p.add_argument("--no-chunking", action="store_true",
                   help="close a prefill batch when the next prompt does not fit (default: chunk it)")
    p.add_argument("--sweep", nargs="?", const="", metavar="RATES",
                   help="goodput against rate (comma-separated req/s; default fractions of the design rate) and "
                        "the highest rate whose p90 TTFT and TPOT meet the SLO while serving >= 97%% of it")
    p.add_argument("--json", action="store_true", help="print a JSON document instead of text")
    p.add_argument("--html", metavar="FILE", help="also write a page with the latency distributions and queues")
    p.set_defaults(func=run)


def _rates(text: str) -> list[float]:
    out = []
    for part in text.split(","):
        try:
            x = float(part)
        except ValueError:
            raise InputError(f"--sweep {text!r}: {part!r} is not a rate; give comma-separated requests/s") from None
        if not x > 0 or x == float("inf"):
            raise InputError(f"--sweep {text!r}: rate {part} must be a finite number > 0")
        out.append(x)
    return out


def run(args: argparse.Namespace) -> int:
    from planner.ir.fileio import check_output_path, write_atomic
    from planner.ir.plan import load_plan
    from planner.simulate.fleet import fleet_of_plan
    from planner.simulate.page import render_page
    from planner.simulate.report import Settings, Slo, simulate, sweep
    from planner.simulate.workload import LengthSpec, parse_arrivals, parse_lengths

    # every flag before the plan is read
    for flag in ("duration", "ttft_ms", "tpot_ms"):
        finite("simulate", "--" + flag.replace("_", "-"), getattr(args, flag))
    if not 0 < args.duration <= MAX_DURATION:
        raise InputError(f"simulate: --duration must be in (0, {MAX_DURATION:g}] seconds (got {args.duration:g})")
    for flag in ("ttft_ms", "tpot_ms"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise InputError(f"simulate: --{flag.replace('_', '-')} must be > 0 (got {value:g})")
    at_least("simulate", "--seed", args.seed, 0)
    at_most("simulate", "--seed", args.seed, MAX_SEED)
    if args.html:
        check_output_path(args.html, flag="--html")
    if args.html and args.sweep is not None:
        raise InputError("simulate: --html draws one run; drop --sweep or --html")
    rates = _rates(args.sweep) if args.sweep else None
    arrivals = parse_arrivals(args.arrivals)
    lengths = parse_lengths(args.lengths) if args.lengths else None

    plan = load_plan(args.plan)
    single_hardware("simulate", plan, args.plan, "the fleet simulator prices one kind of hardware")
    wl = plan.workload
    if lengths is None:
        lengths = LengthSpec() if arrivals.kind == "trace" else LengthSpec(wl.input_len, wl.output_len)
    slo = Slo(args.ttft_ms if args.ttft_ms is not None else wl.ttft_slo_ms,
              args.tpot_ms if args.tpot_ms is not None else wl.tpot_slo_ms)
    fleet = fleet_of_plan(plan)
    design = fleet.design_rate
    if arrivals.rate == 0:
        arrivals = arrivals.at_rate(design)
    settings = Settings(duration=args.duration, seed=args.seed, chunked=not args.no_chunking)
    head = {"plan": args.plan, "model": plan.model.name, "topology": plan.topology.name,
            "design_rate": round(design, 4), "arrivals": arrivals.text, "lengths": lengths.text,
            "duration_s": args.duration, "seed": args.seed, "chunked": settings.chunked}
    if args.sweep is not None:
        result = sweep(fleet, arrivals, lengths, settings, slo, rates)
        if args.json:
            sys.stdout.write(json.dumps(head | {"slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms}} | result,
                                        indent=1, sort_keys=True) + "\n")
        else:
            _print_sweep(head, fleet, slo, result)
        return 0
    report = simulate(fleet, arrivals, lengths, settings, slo)
    if args.html:
        write_atomic(args.html, render_page(f"{fleet.name}: {arrivals.text} for {args.duration:g} s", report))
    doc = head | {k: v for k, v in report.items() if k != "outcome"} | {"duration_s": report["duration_s"]}
    if args.json:
        sys.stdout.write(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    else:
        _print_run(doc, fleet, slo)
    if args.html:
        print(f"wrote {args.html}", file=sys.stderr)
    return 0


def _ms(v: float | None) -> str:
    return "unfinished" if v is None else f"{v:,.1f}"


def _describe(head: dict, fleet) -> str:
    if fleet.aggregated:
        what = f"{len(fleet.decode)} aggregated instances (prefill chunked into the decode steps)"
    else:
        what = f"{len(fleet.prefill)} prefill + {len(fleet.decode)} decode instances"
    return f"{fleet.name}: {what} on {fleet.devices} devices; design rate {head['design_rate']:g} req/s"


def _print_run(doc: dict, fleet, slo) -> None:
    out = [_describe(doc, fleet),
           f"stream: {doc['arrivals']} for {doc['duration_s']:g} s (seed {doc['seed']}), lengths {doc['lengths']}: "
           f"{doc['requests']:,} requests, {doc['unfinished']:,} unfinished",
           f"{'':8}{'p50':>12}{'p90':>12}{'p99':>12}{'mean':>12}"]
    for key, name in (("ttft_ms", "TTFT ms"), ("tpot_ms", "TPOT ms")):
        p = doc[key]
        out.append(f"{name:8}" + "".join(f"{_ms(p[k]):>12}" for k in ("p50", "p90", "p99", "mean")))
    th, g, q = doc["throughput"], doc["goodput"], doc["queues"]["max"]
    out.append(f"throughput: {th['requests_per_s']:g} req/s, {th['output_tokens_per_s']:,.0f} output tokens/s "
               f"({th['decode_tokens_per_s_per_device']:,.0f} decode tokens/s per decode device)")
    out.append(f"goodput: {g['requests_per_s']:g} req/s ({g['share']:.1%} of requests; "
               f"{g['requests_per_s_per_device']:.4g} req/s per device) against SLO {slo.text}")
    out.append(f"queues (max): {q['prefill_queue']:,} waiting for prefill, {q['decode_queue']:,} waiting for decode, "
               f"{q['decode_active']:,} decoding")
    print("\n".join(out))


def _print_sweep(head: dict, fleet, slo, result: dict) -> None:
    out = [_describe(head, fleet),
           f"sweep: {head['arrivals'].split(':')[0]} arrivals, {head['duration_s']:g} s each (seed {head['seed']}), "
           f"lengths {head['lengths']}, SLO {slo.text} at p90",
           f"{'rate':>10}{'served':>10}{'goodput':>10}{'per device':>12}{'p90 TTFT ms':>14}{'p90 TPOT ms':>14}  meets"]
    for row in result["points"]:
        out.append(f"{row['rate']:>10.4g}{row['throughput']:>10.4g}{row['goodput']:>10.4g}{row['goodput_per_device']:>12.4g}"
                   f"{_ms(row['p90_ttft_ms']):>14}{_ms(row['p90_tpot_ms']):>14}  {'yes' if row['meets_slo'] else 'no'}")
    best = result["max_rate"]
    if best is None:
        out.append("highest rate meeting the SLO: none of the rates tried")
    else:
        bound = " (the highest rate tried; it may go higher)" if result["max_rate_is_lower_bound"] else ""
        out.append(f"highest rate meeting the SLO: {best:g} req/s{bound}")
    print("\n".join(out))
