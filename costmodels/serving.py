"""Phase-level serving model: step time per named physical term, TPOT, TTFT and throughput per device.

Three deployments: colocated decode (CloudMatrix-Infer: EP over every die, attention DP per
die), disaggregated MoE-attention decode (xDeepServe AFD) and prefill instances. Everything
is per die and per step, plain arithmetic on precomputed topology figures (~tens of us).

Every term of a breakdown is physical and named (docs/costmodel.md lists them with their
sources): compute stages are rooflines with tile padding and measured/published efficiencies
(costmodels/compute.py); communication is a latency term (software floor + hops, summed into
`comm_latency`) and a bandwidth term per collective (costmodels/comm.py); `launch_overhead` is
the per-layer kernel-launch and framework time; `overlap` is the (negative) time microbatching
hides, at the overlap efficiency CMI measured; `pipeline_wait` (AFD) is the round minus one
microbatch's path. The two per-layer constants (launch overhead, overlap efficiency) are the
calibrated ones (costmodels/calibration.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TypeAlias

from costmodels import comm, compute, memory, opcount, profiles
from costmodels.calibration import Calibration, load_calibration
from costmodels.errors import InputError
from costmodels.hardware import ASCEND_910C
from costmodels.model_shape import ModelShape
from costmodels.topology import HOST_GPU_KINDS, Topology

# How a decode instance lays out attention and experts (the plan's Instance.mode uses the same names).
DECODE_MODES = ("colocated", "disaggregated")
STAGES = ("attention", "tp_allreduce", "gate", "dispatch", "experts", "combine", "shared_experts", "dense_ffn",
          "lm_head", "vector_ops", "token_overhead", "comm_latency", "launch_overhead", "overlap")
DECODE_FIX = ("lower --batch-per-device or --kv-len, quantise (--quant int8/fp8/mxfp4, --kv-dtype), "
              "or use a larger --ep")
PREFILL_FIX = "lower --tokens-per-device, quantise (--quant int8/fp8/mxfp4), or spread experts over a larger --ep"


@dataclass(frozen=True)
class _Deployment:
    """What every instance is given, either phase: its size, EP, precision, microbatches, the expert
    imbalance the balancer reached, attention head-TP and the redundant expert slots."""

    devices: int = 0
    ep: int = 0
    quant: str | None = None  # None: the hardware's default (DeviceSpec.default_quant)
    kv_dtype: str | None = None
    microbatches: int = 1
    imbalance: float = 1.0
    attn_tp: int = 1
    redundant_experts: int | None = None


@dataclass(frozen=True)
class DecodeDeployment(_Deployment):
    """A decode instance. Counts of devices are chips (NPU) or GPUs; EP and TP count dies.

    colocated: `devices` run attention (DP per die, or head-TP `attn_tp`) and hold expert slots,
    EP over `ep` dies (0 = all). disaggregated: `attention_devices` run attention in `dp_domains` domains
    taking turns on the `moe_devices`, which hold the experts (EP = all their dies).
    batch_per_device: sequences per (attention) device. mtp_accept > 0 turns on one MTP draft
    token with that acceptance: 1 + a tokens per step.
    """

    mode: str = "colocated"
    attention_devices: int = 0
    moe_devices: int = 0
    dp_domains: int = 1
    batch_per_device: float = 96
    kv_len: int = 4096
    mtp_accept: float = 0.0


@dataclass(frozen=True)
class PrefillDeployment(_Deployment):
    """A prefill instance of `devices` devices (0 = all), EP over `ep` dies (0 = all of them).

    Each device processes `tokens_per_device` prompt tokens per batch, in prompts of `prompt_len`;
    a share `prefix_hit` of every prompt is already cached (not recomputed, still attended).
    """

    tokens_per_device: int = 16384
    prompt_len: int = 4096
    prefix_hit: float = 0.0


# Either phase's deployment; the class is the discriminator (estimate() dispatches on it).
Deployment: TypeAlias = DecodeDeployment | PrefillDeployment


@dataclass(frozen=True)
class Estimate:
    """A prediction. Times in ms; throughput in tokens/s per device (decode: output tokens; prefill:
    prompt tokens); memory in GB per device (the fullest role); breakdown sums to the step (decode)
    or to TTFT (prefill)."""

    phase: str
    mode: str
    step_ms: float
    tpot_ms: float | None
    ttft_ms: float | None
    throughput_per_device: float
    breakdown: dict[str, float]
    memory_per_device_gb: float
    memory: dict[str, dict[str, float]]
    feasible: bool
    infeasible_reason: str
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Canonical JSON-ready form: sorted keys, floats rounded to 4 decimals."""
        return _canonical({
            "phase": self.phase, "mode": self.mode, "step_ms": self.step_ms, "tpot_ms": self.tpot_ms,
            "ttft_ms": self.ttft_ms, "throughput_per_device": self.throughput_per_device,
            "breakdown": self.breakdown, "memory_per_device_gb": self.memory_per_device_gb,
            "memory": self.memory, "feasible": self.feasible, "infeasible_reason": self.infeasible_reason,
            "details": self.details,
        })


def _canonical(value):
    if isinstance(value, float):
        return round(value, 4) + 0.0  # + 0.0 turns -0.0 into 0.0
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


# --- validation ---------------------------------------------------------------------------------------


def _positive(flag: str, value: float, *, integer: bool = False, zero_ok: bool = False) -> None:
    ok = value >= 0 if zero_ok else value > 0
    if integer and (isinstance(value, bool) or int(value) != value):
        ok = False
    if not ok or not math.isfinite(value):
        need = ">= 0" if zero_ok else "> 0"
        raise InputError(f"{flag} {value}: must be a{'n integer' if integer else ' number'} {need}")


def _instance_dies(topo: Topology, devices: int, flag: str = "--devices") -> int:
    _positive(flag, devices, integer=True)
    if devices > topo.num_devices:
        raise InputError(f"{flag} {devices}: {topo.name} has only {topo.num_devices} devices")
    return devices * topo.dies_per_device


def _check_ep(ep: int, dies: int, what: str) -> None:
    _positive("--ep", ep, integer=True)
    if ep > dies or dies % ep:
        raise InputError(f"--ep {ep}: EP groups must tile the {dies} dies of the {what}; use a divisor of {dies}")


def _check_tp(tp: int, dies: int) -> None:
    _positive("--attn-tp", tp, integer=True)
    if dies % tp:
        raise InputError(f"--attn-tp {tp}: must divide the {dies} attention dies")


def _check_common(imbalance: float, microbatches: int) -> None:
    _positive("--microbatches", microbatches, integer=True)
    if microbatches > 16:
        raise InputError(f"--microbatches {microbatches}: at most 16")
    if not (math.isfinite(imbalance) and imbalance >= 1.0):
        raise InputError(f"--imbalance {imbalance}: max/mean expert load must be >= 1.0")


# --- shared stage arithmetic ----------------------------------------------------------------------


@dataclass(frozen=True)
class _MoE:
    """One MoE layer for one microbatch, per die (us): the transfers' latency and bandwidth terms apart."""

    dispatch: float  # bandwidth term
    experts: float  # routed-expert dies
    shared: float  # extra critical-path time of the shared expert
    combine: float  # bandwidth term
    latency: float  # dispatch + combine latency terms (floor + hops)
    routed_pairs: float
    tokens_per_expert: float

    @property
    def compute(self) -> float:
        return self.experts + self.shared

    @property
    def comm(self) -> float:
        return self.dispatch + self.combine + self.latency


_NO_MOE = _MoE(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


def _moe_colocated(shape: ModelShape, topo: Topology, prec: compute.Precision, layout: memory.ExpertLayout,
                   tokens: float, imbalance: float, prefill: bool = False) -> _MoE:
    """EP over `layout.ep` dies, each routing `tokens` tokens (its attention share) per microbatch.

    prefill: the transfers run the high-throughput (normal) all-to-all kernels where the fabric has
    measured ones (DeepEP on NVIDIA), else the low-latency ones decode runs."""
    if shape.num_routed_experts == 0:
        return _NO_MOE
    hw = topo.hardware
    group_tokens = tokens * layout.ep
    pairs = group_tokens * shape.top_k / layout.routed_dies * imbalance
    slots = layout.max_slots_per_routed_die
    routed = compute.experts_us(shape, hw, prec, pairs=pairs, slots=slots, params_per_expert=shape.params_expert,
                                podplan_kernel=_runs_podplan(topo))
    shared = 0.0
    if layout.shared_dies > 0:  # dedicated dies run it in parallel: only the excess is on the path
        shared = max(0.0, compute.experts_us(shape, hw, prec, pairs=group_tokens / layout.shared_dies, slots=1,
                                             params_per_expert=shape.params_shared, op_class="dense_gemm") - routed)
    elif layout.has_shared:
        shared = compute.experts_us(shape, hw, prec, pairs=tokens, slots=1, params_per_expert=shape.params_shared,
                                    op_class="dense_gemm")
    dests = memory.dests_per_token(shape, layout)
    d_lat, d_bw = comm.dispatch_parts(topo, tokens, shape.hidden, prec.dispatch_dtype, dests, layout.ep, imbalance)
    c_lat, c_bw = comm.combine_parts(topo, tokens, shape.hidden, dests, layout.ep, imbalance)
    if prefill:
        normal_d = comm.normal_a2a_parts(topo, "dispatch", tokens, dests, comm.dispatch_dest_bytes(
            shape.hidden, prec.dispatch_dtype), layout.ep, imbalance)
        normal_c = comm.normal_a2a_parts(topo, "combine", tokens, dests, comm.combine_dest_bytes(shape.hidden),
                                         layout.ep, imbalance)
        if normal_d and normal_c:
            (d_lat, d_bw), (c_lat, c_bw) = normal_d, normal_c
    return _MoE(dispatch=d_bw, experts=routed, shared=shared, combine=c_bw, latency=d_lat + c_lat,
                routed_pairs=pairs, tokens_per_expert=pairs / slots if slots else 0.0)


def _overlap_term(total_us: float, stages: dict[str, float]) -> float:
    """What microbatch overlap hides: the step less its terms' sequential sum (<= 0). Rounding residue of
    a step with nothing overlapped (|x| < 1e-9 of the step) is 0, so plans do not carry 1e-15 noise."""
    hidden = total_us - sum(stages.values())
    return 0.0 if abs(hidden) <= 1e-9 * max(abs(total_us), 1.0) else hidden


def _overlapped(compute_us: float, comm_us: float, m: int, eff: float) -> float:
    """A layer of m microbatches alternating compute and communication (totals over the m).

    Perfect overlap reaches max(compute, comm, (compute + comm) / m); `eff` (0..1, calibrated on
    CMI's measured microbatching gains) is the share of that ideal saving realised. m = 1: none.
    """
    serial = compute_us + comm_us
    if m <= 1:
        return serial
    ideal = max(compute_us, comm_us, serial / m)
    return serial - eff * (serial - ideal)


def _finish(breakdown: dict[str, float]) -> dict[str, float]:
    return {k: v / 1e3 for k, v in breakdown.items()}  # us -> ms


def _token_us(cal: Calibration, hw, tokens: float) -> float:
    """Per-token framework work of one layer (routing top-k and sort, dispatch packing, RoPE, KV-cache
    writes and block tables, sampling): the calibrated per-token time of an Ascend 910C die, scaled to
    `hw` by HBM bandwidth (the work is memory-bound elementwise code)."""
    return cal.token_us_per_layer * tokens * ASCEND_910C.hbm_tbps / hw.hbm_tbps


def _sources(topo: Topology, cal: Calibration) -> dict:
    """Where the estimate's numbers come from: the device's profile or spec sheet, and the calibration."""
    return {"hardware_source": profiles.source_of(topo.hardware),
            "efficiencies": compute.efficiencies(topo.hardware).source,
            "calibration": cal.to_dict()}


def _runs_podplan(topo: Topology) -> bool:
    """A topology `podplan run` executes (this host's GPUs): its experts run podplan's own kernel."""
    return topo.kind in HOST_GPU_KINDS


def _expert_reads(shape: ModelShape, topo: Topology, prec: compute.Precision, pairs: float, slots: float) -> dict:
    """How the routed experts' weights are read: distinct experts a die's pairs touch, and at what rate."""
    touched, rate = compute.expert_reads(topo.hardware, prec, pairs=pairs, slots=slots,
                                         params_per_expert=shape.params_expert, podplan_kernel=_runs_podplan(topo))
    return {"experts_touched_per_die": touched, "expert_stream_tbps": rate}


def _terms(n_moe: int, n_dense: int, m: int, moe: _MoE, *, att: float, tp_bw: float, tp_lat: float, gate: float,
           ffn: float, head: float, vec_moe: float, vec_dense: float, tok_cost: float, launch: float) -> dict[str, float]:
    """A step's named terms (us): each per-layer cost times the layers and microbatches it runs on,
    summed sequentially (what microbatch overlap hides is the caller's `overlap` term)."""
    layers_mb = (n_moe + n_dense) * m
    return {
        "attention": layers_mb * att,
        "tp_allreduce": (n_moe + 2 * n_dense) * m * tp_bw,
        "gate": n_moe * m * gate,
        "dispatch": n_moe * m * moe.dispatch,
        "experts": n_moe * m * moe.experts,
        "combine": n_moe * m * moe.combine,
        "shared_experts": n_moe * m * moe.shared,
        "dense_ffn": n_dense * m * ffn,
        "lm_head": head,
        "vector_ops": n_moe * m * vec_moe + n_dense * m * vec_dense,
        "token_overhead": layers_mb * tok_cost,
        "comm_latency": n_moe * m * moe.latency + (n_moe + 2 * n_dense) * m * tp_lat,
        "launch_overhead": layers_mb * launch,
    }


def estimate(shape: ModelShape, topo: Topology, dep: Deployment, calibration: Calibration | None = None) -> Estimate:
    """The estimate of either phase: `estimate_decode` or `estimate_prefill` by the deployment's type."""
    if isinstance(dep, DecodeDeployment):
        return estimate_decode(shape, topo, dep, calibration)
    return estimate_prefill(shape, topo, dep, calibration)


# --- decode -----------------------------------------------------------------------------------------


def estimate_decode(shape: ModelShape, topo: Topology, dep: DecodeDeployment,
                    calibration: Calibration | None = None) -> Estimate:
    """Decode step, TPOT and throughput per device for a colocated or disaggregated deployment."""
    cal = calibration or load_calibration()
    _positive("--batch-per-device", dep.batch_per_device)
    _positive("--kv-len", dep.kv_len, integer=True)
    if not 0.0 <= dep.mtp_accept <= 1.0:
        raise InputError(f"--mtp-accept {dep.mtp_accept}: acceptance of the one MTP draft token must be in 0..1")
    _check_common(dep.imbalance, dep.microbatches)
    prec = compute.precision(dep.quant, dep.kv_dtype, topo.hardware)
    if dep.mode == "colocated":
        return _decode_colocated(shape, topo, dep, prec, cal)
    if dep.mode == "disaggregated":
        return _decode_disaggregated(shape, topo, dep, prec, cal)
    raise InputError(f"--mode {dep.mode}: unknown decode mode; use {' or '.join(DECODE_MODES)}")


def _decode_colocated(shape: ModelShape, topo: Topology, dep: DecodeDeployment, prec: compute.Precision,
                      cal: Calibration) -> Estimate:
    hw = topo.hardware
    devices = dep.devices or topo.num_devices
    dies = _instance_dies(topo, devices)
    ep = dep.ep or dies
    _check_ep(ep, dies, f"{devices}-device decode instance")
    tp = dep.attn_tp
    _check_tp(tp, dies)
    layout = memory.expert_layout(shape, ep, dep.redundant_experts)
    m = dep.microbatches
    drafts = 1 if dep.mtp_accept > 0 else 0
    q = 1 + drafts  # tokens per sequence per step: the next token and the draft being verified
    seqs = dep.batch_per_device / hw.dies
    seqs_mb, tok_mb = seqs / m, seqs * q / m

    # Step 1: one microbatch through one layer of each kind, per die (us).
    att = compute.attention_us(shape, hw, prec, seqs=seqs_mb, q_per_seq=q, kv_len=dep.kv_len, phase="decode",
                               tp=tp, kv_replicas=compute.kv_replicas(shape, tp))
    tp_lat, tp_bw = comm.all_reduce_parts(topo, tp * tok_mb * shape.hidden * 2.0, tp)
    gate = compute.gate_us(shape, hw, tok_mb)
    moe = _moe_colocated(shape, topo, prec, layout, tok_mb, dep.imbalance)
    ffn = compute.dense_ffn_us(shape, hw, prec, tokens=tok_mb, tp=tp)
    # the head runs on every position of the step, and once more per draft for the MTP module
    head = m * compute.lm_head_us(shape, hw, prec, tokens=tok_mb) + drafts * compute.lm_head_us(
        shape, hw, prec, tokens=seqs)
    launch = cal.launch_us_per_layer  # per layer per microbatch: kernel launches and framework
    vec_moe = compute.vector_ops_us(shape, hw, prec, tokens=tok_mb, pairs=moe.routed_pairs,
                                    shared_tokens=tok_mb if layout.shared_replicated else 0.0)
    vec_dense = compute.vector_ops_us(shape, hw, prec, tokens=tok_mb, dense_ffn=True)
    tok_cost = _token_us(cal, hw, tok_mb)

    # Step 2: layers; the MTP module counts as one more MoE layer per draft token (DSV3 §2.2).
    n_moe = shape.num_moe_layers + (drafts if shape.num_moe_layers else 0)
    n_dense = shape.num_dense_layers + (drafts if not shape.num_moe_layers else 0)
    tp_comm = tp_lat + tp_bw
    moe_compute = m * (att + gate + moe.compute + vec_moe + tok_cost + launch)
    moe_comm = m * (tp_comm + moe.comm)
    dense_compute, dense_comm = m * (att + ffn + vec_dense + tok_cost + launch), m * 2 * tp_comm
    moe_layer = _overlapped(moe_compute, moe_comm, m, cal.overlap_efficiency)
    dense_layer = _overlapped(dense_compute, dense_comm, m, cal.overlap_efficiency)
    t_iter = n_moe * moe_layer + n_dense * dense_layer + head

    # Step 3: the breakdown: every term's sequential sum, minus what microbatch overlap hides.
    stages = _terms(n_moe, n_dense, m, moe, att=att, tp_bw=tp_bw, tp_lat=tp_lat, gate=gate, ffn=ffn, head=head,
                    vec_moe=vec_moe, vec_dense=vec_dense, tok_cost=tok_cost, launch=launch)
    stages["overlap"] = _overlap_term(t_iter, stages)
    step_us = t_iter
    tpot_ms = step_us / 1e3 / (1.0 + dep.mtp_accept)

    # Step 4: memory of the two kinds of die (routed slots, shared expert).
    uses = _colocated_memory(shape, hw, prec, layout, tp, drafts, seqs=seqs, q=q, kv_len=dep.kv_len,
                             tokens_in_flight=seqs * q, pairs=moe.routed_pairs * m)
    feasible, reason = memory.check(uses, DECODE_FIX)
    return Estimate(
        phase="decode", mode="colocated", step_ms=step_us / 1e3, tpot_ms=tpot_ms, ttft_ms=None,
        throughput_per_device=dep.batch_per_device / tpot_ms * 1e3,
        breakdown=_finish(stages),
        memory_per_device_gb=max(u.total for u in uses) * hw.dies,
        memory={u.role: u.to_dict() for u in uses},
        feasible=feasible, infeasible_reason=reason,
        details={
            "topology": topo.name, "devices": devices, "dies": dies, "ep": ep, "attn_tp": tp,
            "microbatches": m, "tokens_per_step": 1.0 + dep.mtp_accept, "sequences_per_die": seqs,
            "routed_slots_per_die": layout.slots_per_routed_die, "shared_expert_dies": layout.shared_dies,
            "redundant_experts": layout.redundant, "quant": prec.quant, "kv_dtype": prec.kv,
            "tokens_per_expert": moe.tokens_per_expert,
            **_expert_reads(shape, topo, prec, moe.routed_pairs, layout.max_slots_per_routed_die),
            **_sources(topo, cal),
            "per_layer_us": {"attention": att, "tp_allreduce": tp_comm, "gate": gate, "dispatch": moe.dispatch,
                             "experts": moe.experts, "combine": moe.combine, "shared_experts": moe.shared,
                             "comm_latency": moe.latency, "dense_ffn": ffn, "vector_ops": vec_moe,
                             "launch_overhead": launch, "moe_layer": moe_layer, "dense_layer": dense_layer},
        },
    )


def _colocated_memory(shape: ModelShape, hw, prec: compute.Precision, layout: memory.ExpertLayout, tp: int,
                      extra: int, *, seqs: float, q: float, kv_len: float, tokens_in_flight: float,
                      pairs: float, role: str = "decode die") -> list[memory.DieMemory]:
    common = memory.replicated_weight_bytes(shape, prec.weight_bytes, tp=tp, extra_layers=extra)
    kv = memory.kv_bytes(shape, seqs * compute.kv_replicas(shape, tp) * (kv_len + q), prec.kv_bytes,
                         extra_layers=extra, seq_len=kv_len + q)
    work = memory.workspace_bytes(shape, tokens_in_flight, pairs, tokens_in_flight)
    kinds = [("routed experts", False)] + ([("shared expert", True)] if layout.shared_dies else [])
    return [
        memory.use(f"{role} ({name})", hw, kv=kv, workspace=work,
                   weights=common + memory.expert_weight_bytes(shape, layout, prec.expert_weight_bytes,
                                                               shared_die=shared, extra_layers=extra,
                                                               shared_weight_bytes=prec.weight_bytes))
        for name, shared in kinds
    ]


def _decode_disaggregated(shape: ModelShape, topo: Topology, dep: DecodeDeployment, prec: compute.Precision,
                          cal: Calibration) -> Estimate:
    hw = topo.hardware
    if shape.num_routed_experts == 0:
        raise InputError(f"--mode disaggregated: {shape.name} has no MoE layers to disaggregate; use --mode colocated")
    if dep.attention_devices <= 0 or dep.moe_devices <= 0:
        raise InputError("--mode disaggregated needs --attention-devices N and --moe-devices N (both > 0)")
    if dep.attention_devices + dep.moe_devices > topo.num_devices:
        raise InputError(f"--attention-devices {dep.attention_devices} + --moe-devices {dep.moe_devices}: "
                         f"{topo.name} has only {topo.num_devices} devices")
    a_dies = _instance_dies(topo, dep.attention_devices, "--attention-devices")
    f_dies = _instance_dies(topo, dep.moe_devices, "--moe-devices")
    if dep.ep and dep.ep != f_dies:
        raise InputError(f"--ep {dep.ep}: with --mode disaggregated the {f_dies} MoE dies form the EP group; "
                         f"drop --ep or pass --ep {f_dies}")
    d = dep.dp_domains
    _positive("--dp-domains", d, integer=True)
    if a_dies % d:
        raise InputError(f"--dp-domains {d}: must divide the {a_dies} attention dies")
    tp = dep.attn_tp
    _check_tp(tp, a_dies // d)
    layout = memory.expert_layout(shape, f_dies, dep.redundant_experts)
    m = dep.microbatches
    drafts = 1 if dep.mtp_accept > 0 else 0
    q = 1 + drafts
    seqs = dep.batch_per_device / hw.dies
    seqs_mb, tok_mb = seqs / m, seqs * q / m
    domain_tokens = a_dies / d * tok_mb  # tokens one domain sends per microbatch
    launch = cal.launch_us_per_layer

    # Step 1: one microbatch of one domain through one MoE layer (us).
    att = compute.attention_us(shape, hw, prec, seqs=seqs_mb, q_per_seq=q, kv_len=dep.kv_len, phase="decode",
                               tp=tp, kv_replicas=compute.kv_replicas(shape, tp))
    tp_lat, tp_bw = comm.all_reduce_parts(topo, tp * tok_mb * shape.hidden * 2.0, tp)
    tp_comm = tp_lat + tp_bw
    gate = compute.gate_us(shape, hw, tok_mb)
    pairs = domain_tokens * shape.top_k / layout.routed_dies * dep.imbalance
    slots = layout.max_slots_per_routed_die
    routed = compute.experts_us(shape, hw, prec, pairs=pairs, slots=slots, params_per_expert=shape.params_expert,
                                podplan_kernel=_runs_podplan(topo))
    if layout.shared_dies:
        shared_die = compute.experts_us(shape, hw, prec, pairs=domain_tokens / layout.shared_dies, slots=1,
                                        params_per_expert=shape.params_shared, op_class="dense_gemm")
        shared = max(0.0, shared_die - routed)
    else:  # replicated on every MoE die, each taking an equal share of the tokens
        shared = compute.experts_us(shape, hw, prec, pairs=domain_tokens / f_dies, slots=1,
                                    params_per_expert=shape.params_shared, op_class="dense_gemm") \
            if layout.has_shared else 0.0
    dests = shape.top_k + (1 if layout.has_shared else 0)
    recv = domain_tokens * dests / f_dies
    a2e_lat, a2e_bw = comm.disaggregated_transfer_parts(
        topo, "a2e", tok_mb * dests, recv, comm.dispatch_dest_bytes(shape.hidden, prec.dispatch_dtype), dep.imbalance)
    e2a_lat, e2a_bw = comm.disaggregated_transfer_parts(
        topo, "e2a", tok_mb * dests, recv, comm.combine_dest_bytes(shape.hidden), dep.imbalance)
    a2e, e2a = a2e_lat + a2e_bw, e2a_lat + e2a_bw
    vec_a = compute.vector_ops_us(shape, hw, prec, tokens=tok_mb)  # norms, residuals, quantisation, combine sum
    vec_e = compute.vector_ops_us(shape, hw, prec, tokens=0.0, pairs=pairs)  # SwiGLU on the MoE die
    tok_cost = _token_us(cal, hw, tok_mb)
    t_a = att + gate + tp_comm + vec_a + tok_cost + launch
    t_e = routed + shared + vec_e
    chain = t_a + a2e + t_e + e2a

    # Step 2: the round per layer (MegaScale-Infer arXiv 2504.02263 / Step-3 arXiv 2507.19427): the
    # attention dies run m microbatches, the MoE dies serve d domains x m microbatches.
    t_round = max(m * t_a, d * m * t_e, d * m * max(a2e, e2a), chain)
    ffn = compute.dense_ffn_us(shape, hw, prec, tokens=tok_mb, tp=tp)
    head = m * compute.lm_head_us(shape, hw, prec, tokens=tok_mb) + drafts * compute.lm_head_us(
        shape, hw, prec, tokens=seqs)
    n_moe = shape.num_moe_layers + drafts
    n_dense = shape.num_dense_layers
    vec_dense = compute.vector_ops_us(shape, hw, prec, tokens=tok_mb, dense_ffn=True)
    dense_layer = m * (att + ffn + 2 * tp_comm + vec_dense + tok_cost + launch)
    t_iter = n_moe * t_round + n_dense * dense_layer + head

    # Step 3: breakdown along one microbatch's path; pipeline_wait is the round minus that path.
    stages = {
        "attention": n_moe * att + n_dense * m * att,
        "tp_allreduce": n_moe * tp_bw + n_dense * m * 2 * tp_bw,
        "gate": n_moe * gate,
        "dispatch": n_moe * a2e_bw,
        "experts": n_moe * routed,
        "combine": n_moe * e2a_bw,
        "shared_experts": n_moe * shared,
        "dense_ffn": n_dense * m * ffn,
        "lm_head": head,
        "vector_ops": n_moe * (vec_a + vec_e) + n_dense * m * vec_dense,
        "token_overhead": n_moe * tok_cost + n_dense * m * tok_cost,
        "comm_latency": n_moe * (a2e_lat + e2a_lat + tp_lat) + n_dense * m * 2 * tp_lat,
        "launch_overhead": n_moe * launch + n_dense * m * launch,
        "pipeline_wait": n_moe * (t_round - chain),
    }
    step_us = t_iter
    tpot_ms = step_us / 1e3 / (1.0 + dep.mtp_accept)
    sequences = dep.attention_devices * dep.batch_per_device
    total_devices = dep.attention_devices + dep.moe_devices

    # Step 4: memory per role.
    attn_use = memory.use(
        "decode attention die", hw,
        weights=memory.replicated_weight_bytes(shape, prec.weight_bytes, tp=tp, extra_layers=drafts),
        kv=memory.kv_bytes(shape, seqs * compute.kv_replicas(shape, tp) * (dep.kv_len + q), prec.kv_bytes,
                           extra_layers=drafts, seq_len=dep.kv_len + q),
        workspace=memory.workspace_bytes(shape, seqs * q, 0.0, seqs * q))
    moe_uses = [
        memory.use(f"decode MoE die ({name})", hw,
                   weights=memory.expert_weight_bytes(shape, layout, prec.expert_weight_bytes, shared_die=is_shared,
                                                      extra_layers=drafts, shared_weight_bytes=prec.weight_bytes),
                   kv=0.0, workspace=memory.workspace_bytes(shape, recv, pairs, 0.0))
        for name, is_shared in [("routed experts", False)] + ([("shared expert", True)] if layout.shared_dies else [])
    ]
    uses = [attn_use] + moe_uses
    feasible, reason = memory.check(uses, DECODE_FIX)
    return Estimate(
        phase="decode", mode="disaggregated", step_ms=step_us / 1e3, tpot_ms=tpot_ms, ttft_ms=None,
        throughput_per_device=sequences / tpot_ms * 1e3 / total_devices,
        breakdown=_finish(stages),
        memory_per_device_gb=max(u.total for u in uses) * hw.dies,
        memory={u.role: u.to_dict() for u in uses},
        feasible=feasible, infeasible_reason=reason,
        details={
            "topology": topo.name, "attention_devices": dep.attention_devices, "moe_devices": dep.moe_devices,
            "af_ratio": dep.attention_devices / dep.moe_devices, "dp_domains": d, "ep": f_dies, "attn_tp": tp,
            "microbatches": m, "tokens_per_step": 1.0 + dep.mtp_accept, "sequences_per_attention_die": seqs,
            "routed_slots_per_die": layout.slots_per_routed_die, "shared_expert_dies": layout.shared_dies,
            "redundant_experts": layout.redundant, "quant": prec.quant, "kv_dtype": prec.kv,
            "tokens_per_expert": pairs / slots if slots else 0.0,
            **_expert_reads(shape, topo, prec, pairs, slots),
            **_sources(topo, cal),
            "per_layer_us": {"attention": t_a, "a2e": a2e, "experts": t_e, "e2a": e2a, "round": t_round,
                             "dense_layer": dense_layer, "launch_overhead": launch},
        },
    )


# --- prefill ----------------------------------------------------------------------------------------


def estimate_prefill(shape: ModelShape, topo: Topology, dep: PrefillDeployment,
                     calibration: Calibration | None = None) -> Estimate:
    """Prefill batch time, TTFT (batch + KV transfer to decode) and prompt tokens/s per device."""
    cal = calibration or load_calibration()
    hw = topo.hardware
    _positive("--tokens-per-device", dep.tokens_per_device)
    _positive("--prompt-len", dep.prompt_len, integer=True)
    if not 0.0 <= dep.prefix_hit < 1.0:
        raise InputError(f"--prefix-hit {dep.prefix_hit}: must be in [0, 1)")
    _check_common(dep.imbalance, dep.microbatches)
    prec = compute.precision(dep.quant, dep.kv_dtype, hw)
    devices = dep.devices or topo.num_devices
    dies = _instance_dies(topo, devices)
    ep = dep.ep or dies
    _check_ep(ep, dies, f"{devices}-device prefill instance")
    tp = dep.attn_tp
    _check_tp(tp, dies)
    layout = memory.expert_layout(shape, ep, dep.redundant_experts)
    m = dep.microbatches
    tokens = dep.tokens_per_device / hw.dies  # prompt tokens per die per batch
    hit = dep.prefix_hit
    computed = tokens * (1.0 - hit)
    prompts = tokens / dep.prompt_len
    tok_mb = computed / m
    mean_kv = opcount.causal_mean_kv(round(dep.prompt_len * (1.0 - hit)), past=round(dep.prompt_len * hit))
    launch = cal.launch_us_per_layer

    # Step 1: one microbatch through one layer, per die (us).
    att = compute.attention_us(shape, hw, prec, seqs=tok_mb, q_per_seq=1.0, kv_len=mean_kv, phase="prefill",
                               tp=tp, kv_replicas=compute.kv_replicas(shape, tp))
    tp_lat, tp_bw = comm.all_reduce_parts(topo, tp * tok_mb * shape.hidden * 2.0, tp)
    tp_comm = tp_lat + tp_bw
    gate = compute.gate_us(shape, hw, tok_mb)
    moe = _moe_colocated(shape, topo, prec, layout, tok_mb, dep.imbalance, prefill=True)
    ffn = compute.dense_ffn_us(shape, hw, prec, tokens=tok_mb, tp=tp)
    head = compute.lm_head_us(shape, hw, prec, tokens=prompts)  # only each prompt's last position
    vec_moe = compute.vector_ops_us(shape, hw, prec, tokens=tok_mb, pairs=moe.routed_pairs,
                                    shared_tokens=tok_mb if layout.shared_replicated else 0.0)
    vec_dense = compute.vector_ops_us(shape, hw, prec, tokens=tok_mb, dense_ffn=True)
    tok_cost = _token_us(cal, hw, tok_mb)

    # Step 2: layers with microbatch overlap, as in decode.
    n_moe, n_dense = shape.num_moe_layers, shape.num_dense_layers
    moe_layer = _overlapped(m * (att + gate + moe.compute + vec_moe + tok_cost + launch), m * (tp_comm + moe.comm),
                            m, cal.overlap_efficiency)
    dense_layer = _overlapped(m * (att + ffn + vec_dense + tok_cost + launch), m * 2 * tp_comm, m,
                              cal.overlap_efficiency)
    step_us = n_moe * moe_layer + n_dense * dense_layer + head
    kv_per_die = memory.kv_bytes(shape, tokens * compute.kv_replicas(shape, tp) / tp, prec.kv_bytes,
                                 seq_len=dep.prompt_len)
    kv_xfer = comm.kv_transfer_us(topo, kv_per_die)

    # Step 3: breakdown summing to TTFT (the batch, then its KV over RDMA to a decode instance).
    stages = _terms(n_moe, n_dense, m, moe, att=att, tp_bw=tp_bw, tp_lat=tp_lat, gate=gate, ffn=ffn, head=head,
                    vec_moe=vec_moe, vec_dense=vec_dense, tok_cost=tok_cost, launch=launch)
    stages["overlap"] = _overlap_term(step_us, stages)
    stages["kv_transfer"] = kv_xfer

    # Step 4: memory.
    uses = _colocated_memory(shape, hw, prec, layout, tp, 0, seqs=tokens, q=0.0, kv_len=1.0,
                             tokens_in_flight=computed, pairs=moe.routed_pairs * m, role="prefill die")
    feasible, reason = memory.check(uses, PREFILL_FIX)
    return Estimate(
        phase="prefill", mode="colocated", step_ms=step_us / 1e3, tpot_ms=None, ttft_ms=(step_us + kv_xfer) / 1e3,
        throughput_per_device=dep.tokens_per_device / step_us * 1e6,
        breakdown=_finish(stages),
        memory_per_device_gb=max(u.total for u in uses) * hw.dies,
        memory={u.role: u.to_dict() for u in uses},
        feasible=feasible, infeasible_reason=reason,
        details={
            "topology": topo.name, "devices": devices, "dies": dies, "ep": ep, "attn_tp": tp, "microbatches": m,
            "prompt_tokens_per_die": tokens, "computed_tokens_per_die": computed, "prompts_per_die": prompts,
            "prefix_hit": hit, "routed_slots_per_die": layout.slots_per_routed_die,
            "shared_expert_dies": layout.shared_dies, "redundant_experts": layout.redundant,
            "quant": prec.quant, "kv_dtype": prec.kv, "tokens_per_expert": moe.tokens_per_expert,
            **_expert_reads(shape, topo, prec, moe.routed_pairs, layout.max_slots_per_routed_die),
            **_sources(topo, cal),
            "per_layer_us": {"attention": att, "tp_allreduce": tp_comm, "gate": gate, "dispatch": moe.dispatch,
                             "experts": moe.experts, "combine": moe.combine, "shared_experts": moe.shared,
                             "comm_latency": moe.latency, "dense_ffn": ffn, "launch_overhead": launch,
                             "moe_layer": moe_layer, "dense_layer": dense_layer, "kv_transfer": kv_xfer},
        },
    )
