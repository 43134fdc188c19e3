"""`podplan compile MODEL --topology T ... -o PLAN.json`: the whole pipeline, one plan file."""

from __future__ import annotations

import argparse
import time

from costmodels.serving import DECODE_MODES
from costmodels.topology import topology_names
from planner.cli import defaults
from planner.cli.args import MAX_SEED, at_most, decode_mode, finite
from planner.cli.console import stderr_console, stdout_console
from planner.cli.progress import Progress


def register(sub: argparse._SubParsersAction) -> None:
    w = defaults.COMPILE_WORKLOAD  # planner.compile's, without importing torch for --help
    p = sub.add_parser("compile", help="compile a model into a deployment plan for a topology")
    p.add_argument("model", help="bundled name, config.json, or a directory holding one")
    p.add_argument("--topology", required=True, help=topology_names())
    p.add_argument("--tpot-ms", type=float, default=w.tpot_slo_ms,
                   help=f"decode TPOT target, ms (default {w.tpot_slo_ms:g})")
    p.add_argument("--ttft-ms", type=float, default=w.ttft_slo_ms, help="prefill TTFT target, ms (default: none)")
    p.add_argument("--input-len", type=int, default=w.input_len, help=f"prompt tokens (default {w.input_len})")
    p.add_argument("--output-len", type=int, default=w.output_len, help=f"output tokens (default {w.output_len})")
    p.add_argument("--prefix-hit", type=float, default=w.prefix_hit, help="prefix-cache hit rate 0..1 (default 0)")
    p.add_argument("--quant", choices=("bf16", "fp8", "int8"), default=w.quant, help=f"weights (default {w.quant})")
    p.add_argument("--mtp-accept", type=float, default=w.mtp_accept, help="MTP draft acceptance 0..1 (default 0: off)")
    p.add_argument("--loads", default=defaults.COMPILE_LOADS,
                   help="expert loads: uniform | zipf:S | hot:K (seeded) or a .npy/.csv/.json/.pt file [MoE layers x experts]")
    p.add_argument("--split", choices=("equal", "weighted"), default=defaults.COMPILE_SPLIT,
                   help="replica token split the runtime will use (default equal: what SGLang/vLLM do)")
    p.add_argument("--time-limit", type=float, default=defaults.COMPILE_TIME_LIMIT,
                   help=f"balancer seconds per sub-problem (default {defaults.COMPILE_TIME_LIMIT:g}; deterministic)")
    p.add_argument("--seed", type=int, default=defaults.COMPILE_SEED, help="seed for generated loads and solvers (default 0)")
    pins = p.add_argument_group("pins (restrict the search; default: search over them)")
    pins.add_argument("--decode-mode", type=decode_mode, choices=DECODE_MODES,
                      help="colocated EP or disaggregated MoE-attention")
    pins.add_argument("--decode-devices", type=int, help="devices per colocated decode instance")
    pins.add_argument("--attention-devices", type=int, help="attention devices per disaggregated decode instance")
    pins.add_argument("--moe-devices", type=int, help="MoE devices per disaggregated decode instance")
    pins.add_argument("--prefill-devices", type=int, help="devices per prefill instance")
    p.add_argument("-o", "--output", required=True, help="plan file to write (JSON)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from planner.compile import CompileOptions, compile_plan, workload_from_flags
    from planner.ir.fileio import check_output_path
    from planner.ir.plan import write_plan
    from planner.search import Pins

    check_output_path(args.output, flag="-o")  # before minutes of compiling, not after
    at_most("compile", "--seed", args.seed, MAX_SEED)
    for flag in ("tpot_ms", "ttft_ms", "prefix_hit", "mtp_accept", "time_limit"):
        finite("compile", "--" + flag.replace("_", "-"), getattr(args, flag))
    workload = workload_from_flags(
        tpot_ms=args.tpot_ms, ttft_ms=args.ttft_ms, input_len=args.input_len, output_len=args.output_len,
        prefix_hit=args.prefix_hit, quant=args.quant, mtp_accept=args.mtp_accept,
    )
    pins = Pins(decode_mode=args.decode_mode, decode_devices=args.decode_devices,
                attention_devices=args.attention_devices, moe_devices=args.moe_devices,
                prefill_devices=args.prefill_devices)
    opts = CompileOptions(workload, pins, loads=args.loads, time_limit=args.time_limit, seed=args.seed,
                          split=args.split)
    t0 = time.perf_counter()
    with Progress("compile") as progress:
        plan = compile_plan(args.model, args.topology, opts, progress=progress.step)
        write_plan(plan, args.output)
    err = stderr_console()
    if err.is_terminal:
        err.log(f"wrote {args.output} in {time.perf_counter() - t0:.1f} s")
    _summary(plan, args.output)
    return 0


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _summary(plan, path: str) -> None:
    """A few short lines (each well under 100 columns, so a terminal never breaks one mid-phrase)."""
    from planner.views.text import step_notes

    out = stdout_console()
    m, t = plan.model, plan.topology
    out.print(f"[bold]{m.name}[/bold] on [bold]{t.name}[/bold] ({t.num_devices} x {t.hardware}) -> {path}")
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
        out.print(f"  {name}: {_plural(n, inst.mode + ' instance')} x {_plural(len(inst.devices), 'device')} ({shape})",
                  soft_wrap=True)
        lat = f"TPOT {p.tpot_ms:.1f} ms" if name == "decode" else f"TTFT {p.ttft_ms:.0f} ms"
        bal = [lp.balance for lp in phase.experts[0].layers if lp.balance is not None]
        worst = f"; expert load max/mean {max(bal):.3f} on the worst layer" if bal else ""
        out.print(f"    {lat}, {p.throughput_per_device:,.0f} tokens/s per device{worst}", soft_wrap=True)
    for note in step_notes(plan):
        out.print(f"  {note}", soft_wrap=True, markup=False)
