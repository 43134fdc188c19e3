"""`ModelShape`: the numbers the cost models need about one MoE transformer.

The planner fills it from the traced model (dimensions read off the real module
weights, parameter counts summed over them); cost models never see torch objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelShape:
    """Architecture of one decoder-only MoE model. Counts are per layer unless named `total`."""

    name: str
    num_layers: int
    moe_layers: tuple[int, ...]  # layer indices whose FFN is a MoE block
    hidden: int
    vocab: int
    # attention: "mla" (DeepSeek multi-head latent attention) or "gqa" (MHA/GQA/MQA)
    attention: str
    num_heads: int
    num_kv_heads: int  # GQA: KV heads; MLA: 1 (one shared latent)
    head_dim: int  # GQA head size; MLA: qk_nope + qk_rope
    # MLA only (0 otherwise)
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    # FFNs
    dense_intermediate: int = 0  # dense FFN layers (0 if none)
    moe_intermediate: int = 0  # one routed expert
    num_routed_experts: int = 0
    num_shared_experts: int = 0  # as the config counts them
    shared_intermediate: int = 0  # total intermediate size of the shared-expert MLP (0 if none)
    top_k: int = 0
    # parameter counts (exact, from the traced modules)
    params_total: int = 0
    params_active: int = 0  # per token: everything but the routed experts not chosen
    params_attention: int = 0  # one layer's attention, incl. its input norm
    params_dense_ffn: int = 0  # one dense FFN layer
    params_expert: int = 0  # one routed expert of one layer
    params_shared: int = 0  # one layer's shared experts
    params_gate: int = 0  # one layer's router
    params_embed: int = 0
    params_head: int = 0  # lm_head + final norm (0 extra if tied)
    # sliding-window attention: `sliding_layers` of the layers attend only the last `sliding_window`
    # keys (gpt-oss: every other layer, 128); their KV cache need not keep older tokens
    sliding_window: int = 0
    sliding_layers: int = 0
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def num_dense_layers(self) -> int:
        return self.num_layers - len(self.moe_layers)

    def attended_kv(self, kv_len: float) -> float:
        """Keys one query attends per layer, averaged over the layers, for a context of `kv_len` keys:
        sliding layers stop at their window. Also the tokens a layer's cache must keep, on average."""
        if not self.sliding_layers or self.sliding_window <= 0 or kv_len <= self.sliding_window:
            return kv_len
        full = self.num_layers - self.sliding_layers
        return (full * kv_len + self.sliding_layers * self.sliding_window) / self.num_layers

    def kv_values_per_token_per_layer(self) -> int:
        """KV-cache values stored per token per layer: MLA latent + rope key, or 2 x kv_heads x head_dim."""
        if self.attention == "mla":
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.num_kv_heads * self.head_dim
