"""`podplan compile MODEL --topology T ... -o PLAN.json`: the whole pipeline, one plan file."""

from __future__ import annotations

import argparse
import json
import textwrap
import time

from typing import TYPE_CHECKING

from costmodels.compute import QUANTS
from costmodels.errors import InputError
from costmodels.serving import DECODE_MODES
from costmodels.topology import MIXED_USAGE, MixedTopology, get_any_topology, topology_names
from planner.cli import defaults
from planner.cli.args import MAX_SEED, at_most, decode_mode, finite
from planner.cli.console import stderr_console, stdout_console
from planner.cli.progress import Progress

if TYPE_CHECKING:  # the search imports the solvers: only `run` loads it
    from planner.search import AnyDeployment, Candidate, SearchResult


def register(sub: argparse._SubParsersAction) -> None:
    w = defaults.COMPILE_WORKLOAD  # planner.compile's, without importing torch for --help
    p = sub.add_parser("compile", help="compile a model into a deployment plan for a topology")
    p.add_argument("model", help="bundled name, config.json, or a directory holding one")
    p.add_argument("--topology", required=True, help=f"{topology_names()}; or {MIXED_USAGE}")
    p.add_argument("--tpot-ms", type=float, default=w.tpot_slo_ms,
                   help=f"decode TPOT target, ms (default {w.tpot_slo_ms:g})")
    p.add_argument("--ttft-ms", type=float, default=w.ttft_slo_ms, help="prefill TTFT target, ms (default: none)")
    p.add_argument("--input-len", type=int, default=w.input_len, help=f"prompt tokens (default {w.input_len})")
    p.add_argument("--output-len", type=int, default=w.output_len, help=f"output tokens (default {w.output_len})")
    p.add_argument("--prefix-hit", type=float, default=w.prefix_hit, help="prefix-cache hit rate 0..1 (default 0)")
    p.add_argument("--quant", choices=QUANTS, default=None,
                   help="weights; mxfp4/nvfp4: FP4 expert weights (default: the hardware's, INT8 on Ascend, FP8 on "
                        "Hopper and Blackwell, BF16 on A100, as `podplan estimate`)")
    p.add_argument("--mtp-accept", type=float, default=w.mtp_accept, help="MTP draft acceptance 0..1 (default 0: off)")
    p.add_argument("--loads", default=defaults.COMPILE_LOADS,
                   help="expert loads: uniform | zipf:S | hot:K (seeded) or a .npy/.csv/.json/.pt file [MoE layers x experts]")
    p.add_argument("--split", choices=("equal", "weighted"), default=defaults.COMPILE_SPLIT,
                   help="replica token split the runtime will use (default equal: what SGLang/vLLM do)")
    p.add_argument("--time-limit", type=float, default=defaults.COMPILE_TIME_LIMIT,
                   help=f"balancer seconds per sub-problem (default {defaults.COMPILE_TIME_LIMIT:g}; deterministic)")
    p.add_argument("--seed", type=int, default=defaults.COMPILE_SEED, help="seed for generated loads and solvers (default 0)")
    p.add_argument("--mode", choices=defaults.COMPILE_MODES, default=defaults.COMPILE_MODE,
                   help="agg: prefill and decode on the same instances (chunked prefill); disagg: separate "
                        "prefill and decode instances; auto: the better of the two (default auto)")
    p.add_argument("--devices", type=int, default=None,
                   help="plan on the first N devices of the topology (default: all)")
    p.add_argument("--json", action="store_true",
                   help="print the chosen plan's summary, both modes and the frontier as JSON (not text)")
    p.add_argument("--rate", type=float, help="requests/s the service must take: keep the decode deployment whose "
                                              "simulated goodput at RATE is highest (docs/simulate.md)")
    pins = p.add_argument_group("pins (restrict the search; default: search over them)")
    pins.add_argument("--decode-mode", type=decode_mode, choices=DECODE_MODES,
                      help="colocated EP or disaggregated MoE-attention")
    pins.add_argument("--decode-devices", type=int, help="devices per colocated decode instance")
    pins.add_argument("--attention-devices", type=int, help="attention devices per disaggregated decode instance")
    pins.add_argument("--moe-devices", type=int, help="MoE devices per disaggregated decode instance")
    pins.add_argument("--prefill-devices", type=int, help="devices per prefill instance")
    pins.add_argument("--attention-tp", type=int, help="attention head-TP degree in dies (1, 2, 4 or 8)")
    p.add_argument("-o", "--output", required=True, help="plan file to write (JSON)")
    p.set_defaults(func=run)


def default_quant(topology: str) -> str:
    """The precision `podplan estimate` also defaults to on this topology's hardware (a mixed topology:
    its first group's, when every group runs it)."""
    topo = get_any_topology(topology)
    if not isinstance(topo, MixedTopology):
        return topo.hardware.default_quant
    hws = [g.topology.hardware for g in topo.groups]
    quant = hws[0].default_quant
    if not all(hw.supports_weights(quant) for hw in hws):
        raise InputError(f"compile: the groups of {topo.name} have no default precision in common; give --quant")
    return quant


def run(args: argparse.Namespace) -> int:
    from planner.compile import CompileOptions, compile_report, workload_from_flags
    from planner.ir.fileio import check_output_path
    from planner.ir.plan import write_plan
    from planner.search import Pins

    check_output_path(args.output, flag="-o")  # before minutes of compiling, not after
    at_most("compile", "--seed", args.seed, MAX_SEED)
    for flag in ("tpot_ms", "ttft_ms", "prefix_hit", "mtp_accept", "time_limit", "rate"):
        finite("compile", "--" + flag.replace("_", "-"), getattr(args, flag))
    if args.rate is not None and args.rate <= 0:
        raise InputError(f"compile: --rate must be > 0 requests/s (got {args.rate:g})")
    workload = workload_from_flags(
        tpot_ms=args.tpot_ms, ttft_ms=args.ttft_ms, input_len=args.input_len, output_len=args.output_len,
        prefix_hit=args.prefix_hit, quant=args.quant or default_quant(args.topology), mtp_accept=args.mtp_accept,
    )
    pins = Pins(decode_mode=args.decode_mode, decode_devices=args.decode_devices,
                attention_devices=args.attention_devices, moe_devices=args.moe_devices,
                prefill_devices=args.prefill_devices, attention_tp=args.attention_tp)
    opts = CompileOptions(workload, pins, loads=args.loads, time_limit=args.time_limit, seed=args.seed,
                          split=args.split, mode=args.mode, devices=args.devices, rate=args.rate)
    t0 = time.perf_counter()
    topo = get_any_topology(args.topology)
    if isinstance(topo, MixedTopology):
        return _run_mixed(args, topo, opts, t0)
    with Progress("compile") as progress:
        plan, sr = compile_report(args.model, args.topology, opts, progress=progress.step)
        write_plan(plan, args.output)
    err = stderr_console()
    if err.is_terminal:
        err.log(f"wrote {args.output} in {time.perf_counter() - t0:.1f} s")
    if args.json:
        print(json.dumps(report(plan, sr, args.output), indent=1, sort_keys=True))
    else:
        _summary(plan, sr, args.output)
    return 0


def _point(c: Candidate[AnyDeployment], chosen: bool) -> dict:
    from planner.search import config_line

    e = c.estimate
    return {"phase": c.phase, "config": config_line(c), "devices": c.instance_devices,
            "tokens_per_s_per_device": round(c.tput, 2), "tpot_ms": None if e.tpot_ms is None else round(e.tpot_ms, 3),
            "ttft_ms": None if e.ttft_ms is None else round(e.ttft_ms, 1), "chosen": chosen}


def frontier_rows(sr: SearchResult) -> list[dict]:
    """The search's frontier (decode or aggregated, and the best prefill of each size), chosen ones marked."""
    chosen = {sr.decode.deployment, getattr(sr.prefill, "deployment", None)}
    rows = [_point(c, c.deployment in chosen) for c in sr.frontier]
    for c in (sr.decode, sr.prefill):  # the chosen point need not be on the per-device frontier
        if c is not None and c.deployment not in {f.deployment for f in sr.frontier}:
            rows.append(_point(c, True))
    return rows


def report(plan, sr: SearchResult, path: str) -> dict:
    """What `compile --json` prints: the chosen plan's summary, both modes' best, idle devices, the frontier."""
    wl = plan.workload
    phases = {}
    for name, phase in plan.phases.items():
        p = phase.predictions
        inst = phase.instances[0]
        phases[name] = {"instances": len(phase.instances), "devices_per_instance": len(inst.devices),
                        "layout": inst.mode, "ep": inst.ep, "tokens_per_s_per_device": round(p.throughput_per_device, 2),
                        "tpot_ms": None if p.tpot_ms is None else round(p.tpot_ms, 3),
                        "ttft_ms": None if p.ttft_ms is None else round(p.ttft_ms, 1)}
    return {
        "model": plan.model.name, "topology": plan.topology.name, "plan": path,
        "hardware_source": _hardware_source(plan.topology.name),
        "devices": {"topology": plan.topology.num_devices, "slice": sr.slice.devices, "used": sr.devices_used,
                    "idle": sr.slice.devices - sr.devices_used},
        "mode": sr.mode, "why": sr.why, "notes": list(sr.notes),
        "requests_per_s": round(sr.requests_per_s, 4),
        "output_tokens_per_s_per_device": round(sr.requests_per_s * wl.output_len / sr.slice.devices, 4),
        "phases": phases,
        "modes": [m.summary(wl, sr.slice.devices) for m in sr.modes],
        "frontier": frontier_rows(sr),
    }


def _hardware_source(topology: str) -> str:
    """Whether the cost model ran on a measured profile, one derived from it, or spec-sheet values."""
    from costmodels import profiles

    topo = get_any_topology(topology)  # the single-hardware summary: a plain Topology
    return profiles.source_of(topo.hardware)  # type: ignore[union-attr]


def _ms(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _summary(plan, sr: SearchResult, path: str) -> None:
    """Short lines (well under 100 columns, so a terminal never breaks one mid-phrase), then the tables."""
    from rich.table import Table

    from planner.compile import mode_config
    from planner.views.text import step_notes

    out = stdout_console()
    m, t = plan.model, plan.topology
    sliced = f", first {sr.slice.devices} devices" if sr.slice.devices < t.num_devices else ""
    out.print(f"[bold]{m.name}[/bold] on [bold]{t.name}[/bold] ({t.num_devices} x {t.hardware}{sliced}) -> {path}")
    both = " (prefill chunked into decode steps)" if plan.prefill is None else ""
    for name in ("prefill", "decode"):
        phase = getattr(plan, name)
        if phase is None:
            continue
        inst = phase.instances[0]
        p = phase.predictions
        n = len(phase.instances)
        shape = (f"{_plural(len(inst.attention_devices), 'attention device')} + "
                 f"{_plural(len(inst.expert_devices), 'expert device')}" if inst.mode == "disaggregated"
                 else f"EP{inst.ep}")
        shared = set(inst.shared_expert_devices)
        if shared and shared != set(inst.expert_devices):  # the devices `podplan show` counts as well
            shape += f"; shared experts on {_plural(len(shared), 'device')}"
        label = "prefill+decode" if name == "decode" and plan.prefill is None else name
        out.print(f"  {label}: {_plural(n, inst.mode + ' instance')} x {_plural(len(inst.devices), 'device')} "
                  f"({shape}){both}", soft_wrap=True)
        lat = f"TPOT {p.tpot_ms:.1f} ms" if name == "decode" else f"TTFT {p.ttft_ms:.0f} ms"
        if name == "decode" and p.ttft_ms is not None:
            lat += f", TTFT {p.ttft_ms:.0f} ms"
        bal = [lp.balance for lp in phase.experts[0].layers if lp.balance is not None]
        worst = f"; expert load max/mean {max(bal):.3f} on the worst layer" if bal else ""
        out.print(f"    {lat}, {p.throughput_per_device:,.0f} tokens/s per device{worst}", soft_wrap=True)
    for note in step_notes(plan):
        out.print(f"  {note}", soft_wrap=True, markup=False)
    out.print(f"  mode {sr.mode}: {sr.why}")
    for line in textwrap.wrap(f"hardware figures: {_hardware_source(plan.topology.name)}", 96,
                              initial_indent="  ", subsequent_indent="    "):
        out.print(line, markup=False, highlight=False)
    for note in sr.notes:  # wrapped here, at words, rather than by the terminal mid-phrase
        for line in textwrap.wrap(note, 96, initial_indent="  ", subsequent_indent="    "):
            out.print(line, markup=False, highlight=False)
    wl = plan.workload
    modes = Table(title="best of each mode", title_justify="left", box=None, pad_edge=False)
    for col in ("mode", "req/s", "out tok/s/dev", "devices", "TPOT ms", "TTFT ms", "configuration"):
        modes.add_column(col, justify="left" if col in ("mode", "configuration") else "right",
                         overflow="fold" if col == "configuration" else "ellipsis")
    for r in sr.modes:
        if not r.ok:
            modes.add_row(r.mode, "-", "-", "-", "-", "-", f"no plan: {r.error}")
            continue
        s = r.summary(wl, sr.slice.devices)
        cfg = mode_config(r)  # as the plan's search record says it
        modes.add_row(r.mode + (" (chosen)" if r is sr.modes[0] else ""), f"{r.requests_per_s:,.2f}",
                      f"{s['output_tokens_per_s_per_device']:,.0f}", str(r.devices_used), _ms(s["tpot_ms"]),
                      _ms(s["ttft_ms"], 0), cfg)
    out.print(modes)
    table = Table(title="frontier (top 5 per phase by tokens/s per device)", title_justify="left", box=None,
                  pad_edge=False)
    for col in ("phase", "configuration", "devices", "tok/s/dev", "TPOT ms", "TTFT ms", ""):
        table.add_column(col, justify="left" if col in ("phase", "configuration", "") else "right")
    rows = frontier_rows(sr)
    for phase in dict.fromkeys(r["phase"] for r in rows):
        ranked = sorted((row for row in rows if row["phase"] == phase), key=lambda row: -row["tokens_per_s_per_device"])
        top = ranked[:5] + [row for row in ranked[5:] if row["chosen"]]
        for row in top:
            table.add_row(phase, row["config"], str(row["devices"]), f"{row['tokens_per_s_per_device']:,.0f}",
                          _ms(row["tpot_ms"]), _ms(row["ttft_ms"], 0), "chosen" if row["chosen"] else "")
    out.print(table)


def _run_mixed(args: argparse.Namespace, topo: MixedTopology, opts, t0: float) -> int:
    """compile on a mixed topology: the plan, then which group serves which phase and why."""
    from planner.hetero import compile_mixed, summary
    from planner.ir.plan import write_plan

    with Progress("compile") as progress:
        plan, res = compile_mixed(args.model, topo, opts, progress=progress.step)
        write_plan(plan, args.output)
    err = stderr_console()
    if err.is_terminal:
        err.log(f"wrote {args.output} in {time.perf_counter() - t0:.1f} s")
    rows = summary(res, plan.workload)
    if args.json:
        both = res.side_by_side
        print(json.dumps({"model": plan.model.name, "topology": topo.name, "plan": args.output, "why": res.why,
                          "devices": topo.num_devices, "assignments": rows,
                          "side_by_side_requests_per_s": None if both is None else round(both, 4),
                          "notes": [n for n in (res.side_by_side_note(),) if n]}, indent=1, sort_keys=True))
        return 0
    _mixed_summary(plan, res, rows, args.output)
    return 0


def _mixed_summary(plan, res, rows: list[dict], path: str) -> None:
    from rich.table import Table

    out = stdout_console()
    t = plan.topology
    hw = " + ".join(f"{g.num_devices} x {g.hardware}" for g in t.groups)
    out.print(f"[bold]{plan.model.name}[/bold] on [bold]{t.name}[/bold] ({hw}) -> {path}", soft_wrap=True)
    win = res.chosen
    for name, phase in plan.phases.items():
        inst = phase.instances[0]
        group = next(g for g in t.groups if g.name == inst.group)
        p = phase.predictions
        label = "prefill+decode" if name == "decode" and plan.prefill is None else name
        out.print(f"  {label} on {group.name} ({group.hardware}): {_plural(len(phase.instances), inst.mode + ' instance')}"
                  f" x {_plural(len(inst.devices), 'device')} (EP{inst.ep})", soft_wrap=True)
        lat = f"TPOT {p.tpot_ms:.1f} ms" if name == "decode" else f"TTFT {p.ttft_ms:.0f} ms"
        if name == "prefill" and win.handoff is not None:
            h = win.handoff
            lat += (f" incl. the KV hand-off to {win.decode} {h.transfer_ms:.1f} ms "
                    f"({h.bytes_per_request / 1e6:,.0f} MB per request at {h.link_gbps_per_device:g} GB/s per device)")
        out.print(f"    {lat}, {p.throughput_per_device:,.0f} tokens/s per device", soft_wrap=True)
    out.print(f"  assignment: {res.why}", soft_wrap=True)
    note = res.side_by_side_note()
    if note:
        out.print(f"  note: {note}", soft_wrap=True)
    table = Table(title="assignments of phases to groups", title_justify="left", box=None, pad_edge=False)
    for col in ("assignment", "req/s", "out tok/s/dev", "devices", "TPOT ms", "TTFT ms", "KV MB/req", "note"):
        table.add_column(col, justify="left" if col in ("assignment", "note") else "right",
                         overflow="fold" if col == "note" else "ellipsis")
    for row in rows:
        name = row["assignment"] + (" (chosen)" if row["chosen"] else "")
        if "error" in row:
            table.add_row(name, "-", "-", "-", "-", "-", "-", f"no plan: {row['error']}")
            continue
        kv = row.get("kv_handoff")
        table.add_row(name, f"{row['requests_per_s']:,.2f}", f"{row['output_tokens_per_s_per_device']:,.0f}",
                      str(row["devices_used"]), _ms(row["tpot_ms"]), _ms(row["ttft_ms"], 0),
                      "-" if kv is None else f"{kv['bytes_per_request'] / 1e6:,.0f}",
                      f"bound by {row['bound']}" if row.get("bound") else "")
    out.print(table)
