"""Compute cost: a roofline per stage with efficiency factors per op class, and numeric precisions.

time = max(FLOPs / (peak(dtype) x compute efficiency), bytes / (HBM bandwidth x memory
efficiency)), per die. FLOP counts come from `costmodels.opcount`.
"""

from __future__ import annotations

from dataclasses import dataclass

from costmodels import opcount
from costmodels.errors import InputError
from costmodels.hardware import DeviceSpec, dtype_bytes
from costmodels.model_shape import ModelShape

# Achieved fraction of peak FLOPs per op class (CMI Tables 8-10).
DENSE_GEMM_EFF = 0.80  # CMI Table 10 [S]: INT8 GEMM 77-83% of peak, midpoint
EXPERT_GEMM_EFF = 0.77  # CMI Table 10 [S], low end: grouped expert GEMMs run smaller tiles
ATTN_COMPUTE_EFF = 0.654  # CMI Table 8 [S]: MLA compute-bound, 65.4% of peak
# Achieved fraction of HBM bandwidth. MLA decode is the one measured memory-bound kernel
# (CMI Table 9 [S], 84.1%); weight-streaming GEMMs are assumed to reach the same.
ATTN_MEMORY_EFF = 0.841
GEMM_MEMORY_EFF = 0.841

OP_CLASSES = {
    "dense_gemm": (DENSE_GEMM_EFF, GEMM_MEMORY_EFF),
    "expert_gemm": (EXPERT_GEMM_EFF, GEMM_MEMORY_EFF),
    "attention": (ATTN_COMPUTE_EFF, ATTN_MEMORY_EFF),
}

QUANTS = ("bf16", "fp8", "int8")
KV_DTYPES = ("bf16", "fp8", "int8")


@dataclass(frozen=True)
class Precision:
    """Formats of one deployment: GEMM weights and activations, the KV cache, the attention core."""

    quant: str  # bf16 | fp8 | int8 (weights and activations of every linear layer: W8A8 for fp8/int8)
    kv: str  # KV-cache format
    attention: str = "bf16"  # the attention core (scores, softmax, PV) stays BF16 (CMI: MLA kernels in BF16)

    @property
    def weight_bytes(self) -> float:
        return dtype_bytes(self.quant)

    @property
    def act_dtype(self) -> str:
        return self.quant

    @property
    def kv_bytes(self) -> float:
        return dtype_bytes(self.kv)


def precision(quant: str, kv: str | None, hw: DeviceSpec) -> Precision:
    """Validated precision for `hw`; kv defaults to BF16. FP8 on Ascend is an error (XDS §4.7)."""
    if quant not in QUANTS:
        raise InputError(f"--quant {quant}: unknown format; use one of {', '.join(QUANTS)}")
    kv = kv or "bf16"
    if kv not in KV_DTYPES:
        raise InputError(f"--kv-dtype {kv}: unknown format; use one of {', '.join(KV_DTYPES)}")
    for flag, fmt in (("--quant", quant), ("--kv-dtype", kv)):
        if not hw.supports(fmt):
            alt = ", ".join(d for d in QUANTS if hw.supports(d))
            raise InputError(f"{flag} {fmt}: {hw.name} has no {fmt.upper()} support (XDS §4.7 for Ascend); use {alt}")
    return Precision(quant=quant, kv=kv)


def roofline_us(hw: DeviceSpec, op_class: str, flops: float, nbytes: float, dtype: str) -> float:
    """Time of one op on one die (us): the slower of its compute and its memory traffic."""
    eff_c, eff_m = OP_CLASSES[op_class]
    compute = flops / (hw.peak_tflops(dtype) * 1e6 * eff_c)  # TFLOPS -> FLOP/us
    memory = nbytes / (hw.hbm_tbps * 1e6 * eff_m)  # TB/s -> bytes/us
    return max(compute, memory)


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
    proj_flops = opcount.matrix_params_flops(shape.params_attention) * tokens
    proj_bytes = shape.params_attention * prec.weight_bytes / tp + 2 * tokens * shape.hidden * dtype_bytes("bf16")
    proj = roofline_us(hw, "dense_gemm", proj_flops, proj_bytes, prec.act_dtype)
    kv_len = shape.attended_kv(kv_len)  # sliding-window layers read at most their window
    if phase == "decode" and shape.attention == "mla":
        core_flops = opcount.mla_absorbed_core_flops(shape, kv_len) * tokens
    else:
        core_flops = opcount.attention_core_flops(shape, kv_len) * tokens
    # decode reads every cached token once per step; prefill writes the new tokens' KV
    cached = seqs * kv_len if phase == "decode" else tokens
    kv_values = shape.kv_values_per_token_per_layer()
    core_bytes = cached * kv_values * prec.kv_bytes * kv_replicas
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
    flops = opcount.gate_flops(shape) * tokens
    nbytes = (shape.num_routed_experts * shape.hidden + tokens * shape.hidden) * dtype_bytes("bf16")
    return roofline_us(hw, "dense_gemm", flops, nbytes, "bf16")


def experts_us(shape: ModelShape, hw: DeviceSpec, prec: Precision, *, pairs: float, slots: float,
               params_per_expert: int, op_class: str = "expert_gemm") -> float:
    """Grouped GEMM of `pairs` token-expert pairs over `slots` resident experts of one die.

    A shared expert is one plain MLP: pass op_class="dense_gemm".
    """
    if pairs <= 0 or slots <= 0:
        return 0.0
    flops = opcount.matrix_params_flops(params_per_expert) * pairs
    nbytes = slots * params_per_expert * prec.weight_bytes + 2 * pairs * shape.hidden * dtype_bytes(prec.act_dtype)
    return roofline_us(hw, op_class, flops, nbytes, prec.act_dtype)


def dense_ffn_us(shape: ModelShape, hw: DeviceSpec, prec: Precision, *, tokens: float, tp: int = 1) -> float:
    """One dense FFN layer for a die's share of `tokens` tokens: with TP, tp x tokens on 1/tp of the weights."""
    if shape.params_dense_ffn == 0 or tokens <= 0:
        return 0.0
    flops = opcount.dense_ffn_flops(shape) * tokens
    nbytes = shape.params_dense_ffn * prec.weight_bytes / tp + 2 * tokens * shape.hidden * dtype_bytes("bf16")
    return roofline_us(hw, "dense_gemm", flops, nbytes, prec.act_dtype)


def lm_head_us(shape: ModelShape, hw: DeviceSpec, prec: Precision, *, tokens: float) -> float:
    """Logits for `tokens` positions (the head's weights are read once)."""
    if tokens <= 0:
        return 0.0
    flops = opcount.lm_head_flops(shape) * tokens
    nbytes = shape.params_head * prec.weight_bytes + tokens * shape.vocab * dtype_bytes("fp32")
    return roofline_us(hw, "dense_gemm", flops, nbytes, prec.act_dtype)
