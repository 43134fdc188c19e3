"""`podplan estimate MODEL --topology T --phase decode|prefill ...`: the cost model for one deployment."""

from __future__ import annotations

import argparse
import json

from costmodels.compute import QUANTS
from costmodels.errors import InputError
from costmodels.serving import DECODE_MODES, DecodeDeployment, Deployment, Estimate, PrefillDeployment, estimate
from costmodels.topology import get_topology, topology_names
from planner.cli.args import decode_mode, single_topology

# Defaults of the flags a user leaves out (None in argparse, so we can tell "not given").
DEFAULTS = {
    "mode": "colocated",
    "batch_per_device": 96.0,  # CMI decode (Table 3)
    "kv_len": 4096,
    "prompt_len": 4096,
    "tokens_per_device": 16384,  # CMI prefill (Table 2)
    "mtp_accept": 0.0,  # MTP off
    "quant": None,  # the hardware's default: INT8 on Ascend, FP8 on Hopper/Blackwell, BF16 on A100 (as compile)
    "kv_dtype": "bf16",
    "microbatches": 1,
    "imbalance": 1.0,  # perfect expert balance
    "attn_tp": 1,
    "dp_domains": 1,
    "prefix_hit": 0.0,
}
DECODE_ONLY = ("mode", "batch_per_device", "kv_len", "mtp_accept", "attention_devices", "moe_devices", "dp_domains")
PREFILL_ONLY = ("prompt_len", "tokens_per_device", "prefix_hit")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("estimate", help="predict TPOT/TTFT, throughput per device, memory and a per-stage breakdown "
                                        "for one deployment")
    p.add_argument("model", help="bundled name (see `podplan models`), a config.json, or a directory holding one")
    p.add_argument("--topology", required=True, help=topology_names())
    p.add_argument("--phase", required=True, choices=("decode", "prefill"))
    p.add_argument("--mode", type=decode_mode, choices=DECODE_MODES,
                   help="decode: colocated attention+experts on every device, or disaggregated MoE-attention "
                        "(default colocated)")
    p.add_argument("--devices", type=int, help="devices (NPU chips / GPUs) in the instance (default: all)")
    p.add_argument("--attention-devices", type=int, help="disaggregated: devices running attention")
    p.add_argument("--moe-devices", type=int, help="disaggregated: devices holding the experts")
    p.add_argument("--dp-domains", type=int, help="disaggregated: attention DP domains taking turns on the MoE devices "
                                                  "(default 1)")
    p.add_argument("--ep", type=int, help="expert-parallel size in dies (default: every die of the instance; "
                                          "disaggregated: every MoE die)")
    p.add_argument("--attn-tp", type=int, help="attention head-TP size in dies (default 1: DP per die)")
    p.add_argument("--batch-per-device", type=float, help="decode: sequences per (attention) device (default 96)")
    p.add_argument("--kv-len", type=int, help="decode: cached tokens per sequence (default 4096)")
    p.add_argument("--prompt-len", type=int, help="prefill: tokens per prompt (default 4096)")
    p.add_argument("--tokens-per-device", type=int, help="prefill: prompt tokens per device per batch (default 16384)")
    p.add_argument("--prefix-hit", type=float, help="prefill: share of each prompt already cached (default 0)")
    p.add_argument("--mtp-accept", type=float, help="decode: MTP draft acceptance a; tokens per step = 1 + a "
                                                    "(default 0: MTP off)")
    p.add_argument("--quant", choices=QUANTS,
                   help="weights and activations; mxfp4/nvfp4: FP4 expert weights (default: the hardware's, INT8 on "
                        "Ascend, FP8 on Hopper and Blackwell, BF16 on A100)")
    p.add_argument("--kv-dtype", choices=("bf16", "fp8", "int8"), help="KV cache format (default bf16)")
    p.add_argument("--microbatches", type=int, help="microbatches overlapping compute and communication (default 1)")
    p.add_argument("--imbalance", type=float, help="expert load max/mean across devices, >= 1 (default 1.0)")
    p.add_argument("--redundant-experts", type=int, help="redundant expert replicas (default: 1 per die when EP <= "
                                                         "routed experts, else what is left after the shared dies)")
    p.add_argument("--json", action="store_true", help="print a JSON document instead of tables")
    p.set_defaults(func=run)


def _value(args: argparse.Namespace, name: str):
    given = getattr(args, name)
    return DEFAULTS.get(name) if given is None else given


def _check_phase_flags(args: argparse.Namespace) -> None:
    wrong = DECODE_ONLY if args.phase == "prefill" else PREFILL_ONLY
    for name in wrong:
        if getattr(args, name) is not None:
            other = "decode" if args.phase == "prefill" else "prefill"
            raise InputError(f"--{name.replace('_', '-')} applies to --phase {other} only; drop it or use --phase {other}")
    mode = _value(args, "mode")
    if args.phase == "decode" and mode == "colocated":
        for name in ("attention_devices", "moe_devices", "dp_domains"):
            if getattr(args, name) is not None:
                raise InputError(f"--{name.replace('_', '-')} applies to --mode disaggregated only; add --mode disaggregated or drop it")
    if args.phase == "decode" and mode == "disaggregated" and args.devices is not None:
        raise InputError("--devices: with --mode disaggregated give --attention-devices and --moe-devices instead")


def build_deployment(args: argparse.Namespace) -> Deployment:
    """The deployment the flags describe, defaults filled in (values are validated by the cost model)."""
    _check_phase_flags(args)
    common = dict(
        ep=args.ep or 0, quant=_value(args, "quant"), kv_dtype=_value(args, "kv_dtype"),
        microbatches=_value(args, "microbatches"), imbalance=_value(args, "imbalance"),
        attn_tp=_value(args, "attn_tp"), redundant_experts=args.redundant_experts,
    )
    if args.ep is not None and args.ep <= 0:
        raise InputError(f"--ep {args.ep}: must be an integer > 0")
    if args.devices is not None and args.devices <= 0:
        raise InputError(f"--devices {args.devices}: must be an integer > 0")
    if args.phase == "prefill":
        return PrefillDeployment(devices=args.devices or 0, tokens_per_device=_value(args, "tokens_per_device"),
                                 prompt_len=_value(args, "prompt_len"),
                                 prefix_hit=_value(args, "prefix_hit"), **common)
    return DecodeDeployment(
        mode=_value(args, "mode"), devices=args.devices or 0, attention_devices=args.attention_devices or 0,
        moe_devices=args.moe_devices or 0, dp_domains=_value(args, "dp_domains"),
        batch_per_device=_value(args, "batch_per_device"), kv_len=_value(args, "kv_len"),
        mtp_accept=_value(args, "mtp_accept"), **common,
    )


def run(args: argparse.Namespace) -> int:
    single_topology("estimate", args.topology)
    topo = get_topology(args.topology)
    dep = build_deployment(args)
    from planner.frontend.trace import model_shape

    shape = model_shape(args.model)
    est = estimate(shape, topo, dep)
    doc = est.to_dict()
    doc.update(model=shape.name, topology=topo.name, topology_sha256=topo.digest(),
               device=topo.hardware.name, dies_per_device=topo.dies_per_device)
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    _print(doc, est, shape.name, topo)
    return 0


def _print(doc: dict, est: Estimate, model: str, topo) -> None:
    from rich.table import Table

    from planner.cli.console import stdout_console

    console = stdout_console()
    d = doc["details"]
    if est.phase == "decode" and est.mode == "disaggregated":
        layout = (f"{d['attention_devices']} attention + {d['moe_devices']} MoE devices "
                  f"(A:F {d['af_ratio']:.2f}, {d['dp_domains']} DP domains), EP{d['ep']}")
    else:
        layout = f"{d['devices']} devices ({d['dies']} dies), EP{d['ep']}"
    if d.get("attn_tp", 1) > 1:
        layout += f", attention TP{d['attn_tp']}"
    console.print(f"[bold]{model}[/bold] on {topo.name} ({topo.hardware.name}): {est.phase} {est.mode}, {layout}, "
                  f"{d['quant']} (KV {d['kv_dtype']}), {d['microbatches']} microbatch(es)")
    summary = Table(show_header=False, box=None)
    summary.add_column(justify="left")
    summary.add_column(justify="right")
    unit = "output tokens/s" if est.phase == "decode" else "prompt tokens/s"
    summary.add_row("throughput per device", f"{est.throughput_per_device:,.0f} {unit}")
    if est.tpot_ms is not None:
        summary.add_row("TPOT", f"{est.tpot_ms:.2f} ms")
        summary.add_row("step (1 + a tokens per sequence)", f"{est.step_ms:.2f} ms ({d['tokens_per_step']:.2f} tokens)")
    if est.ttft_ms is not None:
        summary.add_row("TTFT (batch + KV transfer)", f"{est.ttft_ms:,.1f} ms")
        summary.add_row("batch time", f"{est.step_ms:,.1f} ms")
    summary.add_row("memory per device", f"{est.memory_per_device_gb:.1f} GB of "
                                         f"{topo.hardware.chip_hbm_gb:.0f} GB")
    summary.add_row("feasible", "yes" if est.feasible else "[red]NO[/red]")
    console.print(summary)
    total = sum(est.breakdown.values()) or 1.0
    table = Table(title="breakdown per step" if est.phase == "decode" else "breakdown of TTFT")
    table.add_column("stage")
    table.add_column("ms", justify="right")
    table.add_column("share", justify="right")
    for stage, ms in est.breakdown.items():
        table.add_row(stage, f"{ms:,.2f}", f"{ms / total:6.1%}")
    table.add_row("[bold]total[/bold]", f"[bold]{total:,.2f}[/bold]", "")
    console.print(table)
    notes = ["overlap < 0: time hidden by microbatch overlap",
             "comm_latency: software floor + hops of every collective",
             "launch_overhead and token_overhead: calibrated per-layer framework time (costmodels/calibration.json)"]
    if "pipeline_wait" in est.breakdown:
        notes.append("pipeline_wait: a microbatch waiting for the busier side of the disaggregated pipeline")
    console.print("; ".join(notes))
    if d.get("routed_slots_per_die"):
        console.print(f"experts: {d['experts_touched_per_die']:.1f} of {d['routed_slots_per_die']:g} resident per die "
                      f"touched per layer (balanced routing), weights read at {d['expert_stream_tbps']:.2f} TB/s")
    console.print(f"hardware figures: {d['hardware_source']}")
    if topo.hardware.nominal:
        console.print(f"note: {topo.name} uses nominal {topo.hardware.name} numbers; its predictions are not meaningful")
    if not est.feasible:
        console.print(f"[red]infeasible:[/red] {est.infeasible_reason}")
