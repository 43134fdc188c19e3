"""Operation counts: FLOPs and bytes of the model's building blocks, per token.

Pure arithmetic on dimensions (no torch), shared by the frontend's node annotation and
the serving model. A multiply-add counts as 2 FLOPs.
"""

from __future__ import annotations

from costmodels.model_shape import ModelShape


def linear_flops(in_features: int, out_features: int) -> int:
    """One token through a dense [out, in] projection."""
    return 2 * in_features * out_features


def matrix_params_flops(params: int) -> int:
    """One token through weights holding `params` matrix parameters (every weight used once)."""
    return 2 * params


def attention_core_flops(shape: ModelShape, kv_len: float) -> float:
    """QK^T and PV of one query token against `kv_len` keys, all heads (projections excluded)."""
    if shape.attention == "mla":
        qk = shape.qk_nope_head_dim + shape.qk_rope_head_dim
        v = shape.v_head_dim
    else:
        qk = v = shape.head_dim
    return 2.0 * shape.num_heads * (qk + v) * kv_len


def mla_absorbed_core_flops(shape: ModelShape, kv_len: float) -> float:
    """Decode-time MLA with absorbed up-projections: scores and values in the 512+64 latent space."""
    latent = shape.kv_lora_rank + shape.qk_rope_head_dim
    return 2.0 * shape.num_heads * (latent + shape.kv_lora_rank) * kv_len


def causal_mean_kv(seq: int, past: int = 0) -> float:
    """Mean number of keys a query attends to in a causal prefill of `seq` tokens after `past` cached ones."""
    return past + (seq + 1) / 2.0


def attention_flops(shape: ModelShape, kv_len: float) -> float:
    """One token through one layer's attention: projections (from params) + core."""
    return matrix_params_flops(shape.params_attention) + attention_core_flops(shape, kv_len)


def gate_flops(shape: ModelShape) -> int:
    """Router logits of one token: [E, H] projection."""
    return linear_flops(shape.hidden, shape.num_routed_experts)


def routed_experts_flops(shape: ModelShape) -> int:
    """One token through its top-k routed experts (gate, up, down projections)."""
    return shape.top_k * matrix_params_flops(shape.params_expert)


def shared_experts_flops(shape: ModelShape) -> int:
    return matrix_params_flops(shape.params_shared)


def dense_ffn_flops(shape: ModelShape) -> int:
    return matrix_params_flops(shape.params_dense_ffn)


def lm_head_flops(shape: ModelShape) -> int:
    return linear_flops(shape.hidden, shape.vocab)


def kv_bytes_per_token(shape: ModelShape, kv_dtype_bytes: float) -> float:
    """KV-cache bytes one token occupies across all layers."""
    return shape.num_layers * shape.kv_values_per_token_per_layer() * kv_dtype_bytes


def dispatch_bytes_per_token(shape: ModelShape, act_bytes: float, scale_bytes: float = 0.0) -> float:
    """Attention -> experts: the hidden state to each of the top-k experts, plus routing id and weight.

    `scale_bytes` covers per-token quantisation scales (INT8 dispatch carries one per token).
    """
    routing = 4 + 4  # int32 expert id + fp32 weight per destination
    return shape.top_k * (shape.hidden * act_bytes + scale_bytes + routing)


def combine_bytes_per_token(shape: ModelShape, act_bytes: float = 2.0) -> float:
    """Experts -> attention: one weighted expert output per top-k destination (BF16 in CMI)."""
    return shape.top_k * shape.hidden * act_bytes


def expected_distinct(bins: float, picks: float, limit: float = 0) -> float:
    """Expected distinct bins hit by `picks` uniform draws over `bins` (at most `limit` when > 0): the
    destination nodes (or GPUs) one token's top-k experts land on, or the resident experts a die's
    routed pairs touch, under balanced routing."""
    if bins <= 1:
        return float(bins)
    hit = bins * (1.0 - (1.0 - 1.0 / bins) ** picks)
    return min(hit, limit) if limit > 0 else hit
