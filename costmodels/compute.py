"""Compute cost: a roofline per op with named efficiencies, tile padding, and numeric precisions.

time = max(padded FLOPs / (peak(dtype) x compute efficiency), bytes / (HBM bandwidth x memory
efficiency)), per die. FLOP counts come from `costmodels.opcount`. A GEMM pads its token rows to
the device's smallest tensor-core/cube tile (`DeviceSpec.gemm_tile_m`): a grouped expert GEMM pads
every expert's rows, so its efficiency rises with tokens per expert. The efficiencies come from a
measured hardware profile (costmodels/profiles.py) when one exists for the device, else from the
published kernel measurements below; `efficiencies(hw).source` says which.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from costmodels import opcount, profiles
from costmodels.errors import InputError
from costmodels.hardware import FP4_FORMATS, DeviceSpec, dtype_bytes
from costmodels.model_shape import ModelShape

# Achieved fraction of peak FLOPs per op class when no profile exists (CMI Tables 8-10: the only
# published kernel efficiencies in the references; they are Ascend 910C figures and stand in for
# every device until it has a measured profile).
DENSE_GEMM_EFF = 0.80  # CMI Table 10 [S]: INT8 GEMM 77-83% of peak, midpoint
EXPERT_GEMM_EFF = 0.77  # CMI Table 10 [S], low end: grouped expert GEMMs run smaller tiles
ATTN_COMPUTE_EFF = 0.654  # CMI Table 8 [S]: MLA compute-bound, 65.4% of peak
# Achieved fraction of HBM bandwidth. MLA decode is the one measured memory-bound kernel
# (CMI Table 9 [S], 84.1%); weight-streaming GEMMs are assumed to reach the same.
ATTN_MEMORY_EFF = 0.841
GEMM_MEMORY_EFF = 0.841

QUANTS = ("bf16", "fp8", "int8", "mxfp4", "nvfp4")
KV_DTYPES = ("bf16", "fp8", "int8")


@dataclass(frozen=True)
class Efficiencies:
    """Achieved fractions of one device's peaks, and where they come from."""

    dense_gemm: float
    expert_gemm: float
    attention_compute: float
    attention_memory: float
    gemm_memory: float
    source: str
    # Weight-read efficiency of grouped expert GEMMs per weight format, where a profile measured it
    # ((dtype, fraction of spec HBM), ...); a format not listed streams at `gemm_memory`.
    expert_memory: tuple[tuple[str, float], ...] = ()
    # the same for podplan's own experts kernel, per measured expert size (parameters of one expert) a
    # (tokens per expert, efficiency) curve (profiles.Curves; empty: not measured)
    podplan_expert_memory: profiles.Curves = ()

    def of(self, op_class: str, dtype: str = "", group_params: float = 0.0,
           group_tokens: float = 1.0) -> tuple[float, float]:
        """(compute, memory) efficiency of an op class (dense_gemm, expert_gemm or attention) for weights
        in `dtype`; `group_params`, `group_tokens`: one expert's parameters and rows (podplan's kernel
        was measured over both; 0 parameters: the largest measured)."""
        if op_class == "dense_gemm":
            return self.dense_gemm, self.gemm_memory
        if op_class == "expert_gemm":
            return self.expert_gemm, next((eff for q, eff in self.expert_memory if q == dtype), self.gemm_memory)
        if op_class == "podplan_expert_gemm":
            # podplan's own runtime kernel (runtime.moe_triton, BF16: all `podplan run` executes) at the
            # profile's measured rate for experts of this size, else at the copy rate it was benchmarked
            # near (4.01-4.27 TB/s on H200 against a 4.28 TB/s copy, bench/moe_kernels.py)
            if not self.podplan_expert_memory:
                return self.expert_gemm, self.gemm_memory
            # measured end to end, so at many rows per expert this "memory" rate also carries the
            # kernel's compute (the roofline's max keeps whichever side is slower)
            return self.expert_gemm, profiles.curves_interp(self.podplan_expert_memory, group_params, group_tokens)
        if op_class == "attention":
            return self.attention_compute, self.attention_memory
        raise KeyError(op_class)


PUBLISHED = Efficiencies(DENSE_GEMM_EFF, EXPERT_GEMM_EFF, ATTN_COMPUTE_EFF, ATTN_MEMORY_EFF, GEMM_MEMORY_EFF,
                         source="published kernel efficiencies (CMI Tables 8-10) on spec-sheet peaks")
OP_CLASSES = {name: PUBLISHED.of(name) for name in ("dense_gemm", "expert_gemm", "attention")}


@functools.lru_cache(maxsize=32)
def efficiencies(hw: DeviceSpec) -> Efficiencies:
    """The device's efficiencies: from its measured (or derived) profile where it measured them."""
    prof = profiles.profile_for(hw)
    if prof is None:
        return PUBLISHED
    hbm = min(1.0, prof.hbm_tbps / hw.hbm_tbps) if prof.hbm_tbps > 0 else GEMM_MEMORY_EFF
    dense = prof.gemm_efficiency("bf16", hw.bf16_tflops) or DENSE_GEMM_EFF
    # measured in BF16; applied as the same fraction of the FP8/FP4 peak (docs/profile.md)
    grouped = prof.grouped_efficiency(4096, hw.bf16_tflops) or EXPERT_GEMM_EFF  # the large-group asymptote
    attn_mem = min(1.0, prof.mla_decode_kv_tbps / hw.hbm_tbps) if prof.mla_decode_kv_tbps > 0 else ATTN_MEMORY_EFF
    # A decode-sized grouped GEMM streams its experts' weights well below a plain copy (H200: ~0.5-0.6 of
    # spec against 0.89); the profile's small-group rows give the rate per weight format (docs/profile.md).
    expert_mem = tuple((q, min(1.0, rate / hw.hbm_tbps)) for q in QUANTS
                       if (rate := prof.grouped_stream_tbps(q)) is not None)
    ours = tuple((size, tuple((t, min(1.0, rate / hw.hbm_tbps)) for t, rate in curve))
                 for size, curve in prof.podplan_stream)
    return Efficiencies(dense, grouped, ATTN_COMPUTE_EFF, attn_mem, hbm, source=prof.source, expert_memory=expert_mem,
                        podplan_expert_memory=ours)


@dataclass(frozen=True)
class Precision:
    """Formats of one deployment: GEMM weights and activations, the KV cache, the attention core.

    quant bf16 | fp8 | int8: every linear layer's weights and activations (W8A8 for fp8/int8).
    quant mxfp4 | nvfp4: expert weights in FP4 (as gpt-oss ships MXFP4), everything else BF16; the
    expert GEMMs run on FP4 tensor cores where the device has them (`fp4_compute`), else
    weight-only (dequantised to BF16 in the kernel).
    """

    quant: str
    kv: str  # KV-cache format
    attention: str = "bf16"  # the attention core (scores, softmax, PV) stays BF16 (CMI: MLA kernels in BF16)
    fp4_compute: bool = False

    @property
    def weight_bytes(self) -> float:
        """Bytes per parameter of the non-expert linear layers."""
        return 2.0 if self.quant in FP4_FORMATS else dtype_bytes(self.quant)

    @property
    def expert_weight_bytes(self) -> float:
        return dtype_bytes(self.quant)

    @property
    def act_dtype(self) -> str:
        """Format of the non-expert GEMMs and of the dispatched activations."""
        return "bf16" if self.quant in FP4_FORMATS else self.quant

    @property
    def dispatch_dtype(self) -> str:
        """Format of the activations the MoE dispatch moves: the expert GEMM's input format. FP4 experts
        on FP4 tensor cores take FP4 inputs, which the all-to-all quantises before sending (LMSYS GB200
        Part II: NVFP4 quantisation fused into DeepEP's dispatch "halving the required network
        traffic"; TRT-LLM tech blog 3, DeepSeek R1 throughput on B200: "FP4 AllGather" replaces
        BF16); otherwise the non-expert activation format (FP8/INT8 dispatch, DeepEP and CMI)."""
        return self.quant if self.quant in FP4_FORMATS and self.fp4_compute else self.act_dtype

    @property
    def expert_dtype(self) -> str:
        """Format the expert GEMMs compute in."""
        if self.quant in FP4_FORMATS:
            return "fp4" if self.fp4_compute else "bf16"
        return self.quant

    @property
    def kv_bytes(self) -> float:
        return dtype_bytes(self.kv)


def precision(quant: str | None, kv: str | None, hw: DeviceSpec) -> Precision:
    """Validated precision for `hw`; quant None = the device's default (INT8 on Ascend, FP8 on Hopper and
    Blackwell, BF16 on A100), kv defaults to BF16. A format the device cannot run is an InputError."""
    quant = quant or hw.default_quant
    if quant not in QUANTS:
        raise InputError(f"--quant {quant}: unknown format; use one of {', '.join(QUANTS)}")
    kv = kv or "bf16"
    if kv not in KV_DTYPES:
        raise InputError(f"--kv-dtype {kv}: unknown format; use one of {', '.join(KV_DTYPES)}")
    for flag, fmt in (("--quant", quant), ("--kv-dtype", kv)):
        if not hw.supports_weights(fmt):
            alt = ", ".join(d for d in QUANTS if hw.supports_weights(d))
            why = " (XDS §4.7 for Ascend)" if hw.is_npu else ""
            raise InputError(f"{flag} {fmt}: {hw.name} has no {fmt.upper()} support{why}; use {alt}")
    return Precision(quant=quant, kv=kv, fp4_compute=quant in FP4_FORMATS and hw.fp4_tflops > 0)


def padded_rows(tokens: float, tile: int) -> float:
    """Rows a GEMM of `tokens` rows computes once padded to whole tiles of `tile` rows (tokens > 0)."""
    if tokens <= 0:
        return 0.0
    if tile <= 1:
        return tokens
    return math.ceil(tokens / tile - 1e-9) * tile


def roofline_us(hw: DeviceSpec, op_class: str, flops: float, nbytes: float, dtype: str,
                group_params: float = 0.0, group_tokens: float = 1.0) -> float:
    """Time of one op on one die (us): the slower of its compute and its memory traffic (`group_params`,
    `group_tokens`: one group's parameters and rows in a grouped GEMM, Efficiencies.of)."""
    eff_c, eff_m = efficiencies(hw).of(op_class, dtype, group_params, group_tokens)
    compute = flops / (hw.peak_tflops(dtype) * 1e6 * eff_c)  # TFLOPS -> FLOP/us
    memory = nbytes / (hw.hbm_tbps * 1e6 * eff_m)  # TB/s -> bytes/us
    return max(compute, memory)


def gemm_us(hw: DeviceSpec, op_class: str, *, tokens: float, params: float, weight_bytes: float, dtype: str,
            groups: float = 1.0, extra_bytes: float = 0.0) -> float:
    """`groups` GEMMs (experts) of `tokens` rows each against `params` weights each, rows padded to the tile.

    FLOPs = 2 x params x padded rows x groups; bytes = every group's weights once + `extra_bytes`.
    """
    if tokens <= 0 or groups <= 0:
        return 0.0
    rows = padded_rows(tokens, hw.gemm_tile_m)
    flops = opcount.matrix_params_flops(1) * params * rows * groups
    return roofline_us(hw, op_class, flops, groups * params * weight_bytes + extra_bytes, dtype,
                       group_params=params, group_tokens=tokens)


def grouped_gemm_efficiency(hw: DeviceSpec, prec: Precision, tokens_per_expert: float, params: int) -> float:
    """Useful FLOPs / (peak x time) of a grouped expert GEMM at `tokens_per_expert` (for reports and tests):
    low when weight reads dominate (few tokens) and from tile padding, rising towards the compute efficiency."""
    if tokens_per_expert <= 0:
        return 0.0
    t = gemm_us(hw, "expert_gemm", tokens=tokens_per_expert, params=params, weight_bytes=prec.expert_weight_bytes,
                dtype=prec.expert_dtype)
    return 2.0 * params * tokens_per_expert / (t * hw.peak_tflops(prec.expert_dtype) * 1e6)


# --- stages (per die, one microbatch, one layer) ---------------------------------------------------


def attention_us(shape: ModelShape, hw: DeviceSpec, prec: Precision, *, seqs: float, q_per_seq: float,
                 kv_len: float, phase: str, tp: int = 1, kv_replicas: float = 1.0) -> float:
    """One layer's attention for `seqs` sequences of `q_per_seq` new tokens each, on one die.

    decode: MLA runs absorbed (latent space), reading each sequence's cache once for all its
    query tokens; prefill: causal MHA-style, `kv_len` is the mean keys per query. With head-TP
    `tp` the group of tp dies runs tp x `seqs` sequences on 1/tp of the heads each: the same
    FLOPs per die, 1/tp of the projection weights, and `kv_replicas(shape, tp)` times the cache.
    """
    tokens = seqs * q_per_seq
    proj = gemm_us(hw, "dense_gemm", tokens=tokens * tp, params=shape.params_attention / tp,
                   weight_bytes=prec.weight_bytes, dtype=prec.act_dtype,
                   extra_bytes=2 * tokens * shape.hidden * dtype_bytes("bf16"))
    kv_len = shape.attended_kv(kv_len)  # sliding-window layers read at most their window
    if phase == "decode" and shape.attention == "mla":
        core_flops = opcount.mla_absorbed_core_flops(shape, kv_len) * tokens
    else:
        core_flops = opcount.attention_core_flops(shape, kv_len) * tokens
    # decode reads every cached token once per step; prefill writes the new tokens' KV
    cached = seqs * kv_len if phase == "decode" else tokens
    kv_values = shape.kv_values_per_token_per_layer()
    core_bytes = cached * kv_values * prec.kv_bytes * kv_replicas
    eff_c, eff_m = hw.fused_mla_decode_eff
    if phase == "decode" and shape.attention == "mla" and eff_c > 0:
        # the fused kernel engines run (FlashMLA on Hopper), not the profile's unfused measurement
        core = max(core_flops / (hw.peak_tflops(prec.attention) * 1e6 * eff_c),
                   core_bytes / (hw.hbm_tbps * 1e6 * eff_m))
    else:
        core = roofline_us(hw, "attention", core_flops, core_bytes, prec.attention)
    return proj + core


def kv_replicas(shape: ModelShape, tp: int) -> float:
    """Copies of one sequence's KV inside a head-TP group: MLA's latent is shared by all heads."""
    if shape.attention == "mla":
        return float(tp)
    return max(1.0, tp / max(1, shape.num_kv_heads))


def gate_us(shape: ModelShape, hw: DeviceSpec, tokens: float) -> float:
    """Router logits for `tokens` tokens (BF16, weights read once)."""
    if shape.num_routed_experts == 0:
        return 0.0
    return gemm_us(hw, "dense_gemm", tokens=tokens, params=opcount.gate_flops(shape) / 2, weight_bytes=2.0,
                   dtype="bf16", extra_bytes=tokens * shape.hidden * dtype_bytes("bf16"))


def experts_us(shape: ModelShape, hw: DeviceSpec, prec: Precision, *, pairs: float, slots: float,
               params_per_expert: int, op_class: str = "expert_gemm", podplan_kernel: bool = False) -> float:
    """Grouped GEMM of `pairs` token-expert pairs over `slots` resident experts of one die.

    A shared expert is one plain MLP: pass op_class="dense_gemm". `podplan_kernel`: the experts run on
    podplan's runtime (`podplan run` on this host's GPUs) at its own kernel's measured rate; otherwise
    on a serving engine's grouped GEMM, at the profile's measured grouped rate.
    """
    if pairs <= 0 or slots <= 0:
        return 0.0
    if op_class == "dense_gemm":  # the shared expert: the linear layers' format
        wb, dtype = prec.weight_bytes, prec.act_dtype
    else:
        wb, dtype = prec.expert_weight_bytes, prec.expert_dtype
        op_class = _routed_op(podplan_kernel)
        slots = _touched(slots, pairs)
    return gemm_us(hw, op_class, tokens=pairs / slots, params=params_per_expert, weight_bytes=wb, dtype=dtype,
                   groups=slots, extra_bytes=2 * pairs * shape.hidden * dtype_bytes(prec.act_dtype))


def _routed_op(podplan_kernel: bool) -> str:
    """The op class of routed experts: podplan's own kernel on `podplan run` hosts, else an engine's."""
    return "podplan_expert_gemm" if podplan_kernel else "expert_gemm"


def _touched(slots: float, pairs: float) -> float:
    """Resident experts a grouped GEMM of `pairs` rows over `slots` experts reads: only those that got rows
    (empty groups launch no tiles), the expected distinct ones under balanced routing (skewed routing
    touches fewer, so this is the upper bound)."""
    return opcount.expected_distinct(slots, pairs)


def expert_reads(hw: DeviceSpec, prec: Precision, *, pairs: float, slots: float, params_per_expert: float,
                 podplan_kernel: bool = False) -> tuple[float, float]:
    """How `experts_us` reads the routed experts' weights: (experts touched, TB/s their weights stream at)."""
    touched = _touched(slots, pairs) if pairs > 0 and slots > 0 else 0.0
    tokens = pairs / touched if touched else 1.0
    eff = efficiencies(hw).of(_routed_op(podplan_kernel), prec.expert_dtype, params_per_expert, tokens)[1]
    return touched, hw.hbm_tbps * eff


def dense_ffn_us(shape: ModelShape, hw: DeviceSpec, prec: Precision, *, tokens: float, tp: int = 1) -> float:
    """One dense FFN layer for a die's share of `tokens` tokens: with TP, tp x tokens on 1/tp of the weights."""
    if shape.params_dense_ffn == 0 or tokens <= 0:
        return 0.0
    return gemm_us(hw, "dense_gemm", tokens=tokens * tp, params=shape.params_dense_ffn / tp,
                   weight_bytes=prec.weight_bytes, dtype=prec.act_dtype,
                   extra_bytes=2 * tokens * shape.hidden * dtype_bytes("bf16"))


def lm_head_us(shape: ModelShape, hw: DeviceSpec, prec: Precision, *, tokens: float) -> float:
    """Logits for `tokens` positions (the head's weights are read once)."""
    if tokens <= 0:
        return 0.0
    return gemm_us(hw, "dense_gemm", tokens=tokens, params=opcount.lm_head_flops(shape) / 2,
                   weight_bytes=prec.weight_bytes, dtype=prec.act_dtype,
                   extra_bytes=tokens * shape.vocab * dtype_bytes("fp32"))


# Elementwise passes per token per layer that no GEMM or attention kernel fuses, each a read and a
# write (or two reads and a write) of a hidden-sized BF16 activation: counted from the DeepSeek-V3
# layer (DSV3 §2: pre-attention and pre-FFN RMSNorm, two residual adds) plus the activation
# quantisation that W8A8 GEMMs need at their three inputs (QKV-down, output projection, experts).
NORM_PASSES = 2  # read + write
RESIDUAL_PASSES = 2  # two reads + write
QUANT_PASSES = 3  # read BF16 + write 1 byte


def vector_ops_us(shape: ModelShape, hw: DeviceSpec, prec: Precision, *, tokens: float, pairs: float = 0.0,
                  shared_tokens: float = 0.0, dense_ffn: bool = False) -> float:
    """Memory-bound elementwise work of one layer for `tokens` tokens and `pairs` routed token-expert pairs:
    norms, residual adds, activation quantisation, SwiGLU (reads gate and up, writes the product) and the
    combine's weighted sum of top-k expert outputs. Priced at the device's achieved HBM bandwidth."""
    if tokens <= 0 and pairs <= 0:
        return 0.0
    h = shape.hidden * 2.0  # one BF16 hidden vector
    per_token = h * (2 * NORM_PASSES + 3 * RESIDUAL_PASSES)
    if prec.act_dtype in ("int8", "fp8"):
        per_token += QUANT_PASSES * (h + shape.hidden * 1.0)
    nbytes = tokens * per_token
    if dense_ffn:  # a dense FFN layer: its SwiGLU
        nbytes += tokens * 3 * shape.dense_intermediate * 2.0
    else:  # a MoE layer: SwiGLU of each routed pair and of the shared expert, then the weighted combine
        nbytes += pairs * 3 * shape.moe_intermediate * 2.0 + tokens * (shape.top_k + 1) * h
        nbytes += shared_tokens * 3 * shape.shared_intermediate * 2.0
    return nbytes / (hw.hbm_tbps * 1e6 * efficiencies(hw).gemm_memory)
