"""Hand-built ModelShapes for the cost-model tests (no torch: the numbers the frontend reports)."""

from __future__ import annotations

from costmodels.model_shape import ModelShape

# DeepSeek-V3 exactly as `planner.frontend.trace.model_shape("deepseek-v3")` reports it
# (tests/planner/test_estimate_cli.py checks the two agree).
DSV3 = ModelShape(
    name="deepseek-v3", num_layers=61, moe_layers=tuple(range(3, 61)), hidden=7168, vocab=129280,
    attention="mla", num_heads=128, num_kv_heads=1, head_dim=192, q_lora_rank=1536, kv_lora_rank=512,
    qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, dense_intermediate=18432,
    moe_intermediate=2048, num_routed_experts=256, num_shared_experts=1, shared_intermediate=2048, top_k=8,
    params_total=671026404352, params_active=37552282624, params_attention=187121664,
    params_dense_ffn=396361728, params_expert=44040192, params_shared=44040192, params_gate=1835008,
    params_embed=926679040, params_head=926686208,
)

# A GQA MoE without shared experts or dense layers (Qwen3-30B-A3B-like numbers).
GQA = ModelShape(
    name="gqa-moe", num_layers=48, moe_layers=tuple(range(48)), hidden=2048, vocab=151936, attention="gqa",
    num_heads=32, num_kv_heads=4, head_dim=128, moe_intermediate=768, num_routed_experts=128, top_k=8,
    params_total=30_532_122_624, params_active=3_340_000_000, params_attention=20_000_000,
    params_expert=4_718_592, params_gate=262_144, params_embed=311_164_928, params_head=311_166_976,
)

