"""`podplan compile MODEL --topology T ... -o PLAN.json`: the whole pipeline, one plan file."""

from __future__ import annotations

import argparse
import time

from costmodels.errors import InputError
from costmodels.serving import DECODE_MODES
from costmodels.topology import topology_names
from planner.compile import CompileOptions, compile_plan, workload_from_flags
from planner.search import Pins
from planner.cli.args import MAX_SEED, at_most, decode_mode, finite
from planner.cli.console import stderr_console, stdout_console


def register(sub: argparse._SubParsersAction) -> None:
    d = CompileOptions()
    w = d.workload
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
    p.add_argument("--loads", default=d.loads,
                   help="expert loads: uniform | zipf:S | hot:K (seeded) or a .npy/.csv/.json/.pt file [MoE layers x experts]")
    p.add_argument("--split", choices=("equal", "weighted"), default=d.split,
                   help="replica token split the runtime will use (default equal: what SGLang/vLLM do)")
    p.add_argument("--time-limit", type=float, default=d.time_limit,
                   help=f"balancer seconds per sub-problem (default {d.time_limit:g}; deterministic)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for generated loads and solvers (default 0)")
    p.add_argument("--rate", type=float, help="requests/s the service must take: keep the decode deployment whose "
                                              "simulated goodput at RATE is highest (docs/simulate.md)")
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
    from planner.ir.fileio import check_output_path
    from planner.ir.plan import write_plan

    check_output_path(args.output, flag="-o")  # before minutes of compiling, not after
    at_most("compile", "--seed", args.seed, MAX_SEED)
    for flag in ("tpot_ms", "ttft_ms", "prefix_hit", "mtp_accept", "time_limit", "rate"):
        finite("compile", "--" + flag.replace("_", "-"), getattr(args, flag))
    if args.rate is not None and args.rate <= 0:
        raise InputError(f"compile: --rate must be > 0 requests/s (got {args.rate:g})")
    workload = workload_from_flags(
        tpot_ms=args.tpot_ms, ttft_ms=args.ttft_ms, input_len=args.input_len, output_len=args.output_len,
        prefix_hit=args.prefix_hit, quant=args.quant, mtp_accept=args.mtp_accept,
    )
    pins = Pins(decode_mode=args.decode_mode, decode_devices=args.decode_devices,
                attention_devices=args.attention_devices, moe_devices=args.moe_devices,
                prefill_devices=args.prefill_devices)
    opts = CompileOptions(workload, pins, loads=args.loads, time_limit=args.time_limit, seed=args.seed,
                          split=args.split, rate=args.rate)
    err = stderr_console()
    t0 = time.perf_counter()
    with err.status("compiling") as status:
        def progress(msg: str) -> None:
            status.update(msg)
            if err.is_terminal:  # piped stderr stays clean: one line on error, nothing on success
                err.log(msg)

        plan = compile_plan(args.model, args.topology, opts, progress=progress)
    write_plan(plan, args.output)
    if err.is_terminal:
        err.log(f"wrote {args.output} in {time.perf_counter() - t0:.1f} s")
    _summary(plan, args.output)
    return 0


def _summary(plan, path: str) -> None:
    out = stdout_console()
    m, t = plan.model, plan.topology
    out.print(f"[bold]{m.name}[/bold] on [bold]{t.name}[/bold] ({t.num_devices} x {t.hardware}) -> {path}")
    for name in ("prefill", "decode"):
        phase = getattr(plan, name)
        if phase is None:
            continue
        inst = phase.instances[0]
        p = phase.predictions
        lat = f"TPOT {p.tpot_ms:.1f} ms" if name == "decode" else f"TTFT {p.ttft_ms:.0f} ms"
        bal = [lp.balance for lp in phase.experts[0].layers if lp.balance is not None]
        worst = f", expert balance max/mean {max(bal):.3f} (worst layer)" if bal else ""
        out.print(
            f"  {name}: {len(phase.instances)} x {inst.mode} instance of {len(inst.devices)} devices "
            f"(EP{inst.ep}, {len(inst.attention_devices)} attention / {len(inst.expert_devices)} expert devices), "
            f"{p.throughput_per_device:,.0f} tokens/s per device, {lat}{worst}"
        )
