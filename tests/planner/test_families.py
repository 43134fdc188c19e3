"""Families podplan does not bundle, found structurally: each traces, splits into stages and stays
lossless (prefill, cached prefill, one decode step, experts split over two groups) against transformers.

The configs are each family's own defaults (transformers' config class) shrunk to a few thousand
parameters: the same keys a real config.json of that family carries.
"""

from __future__ import annotations

import random

import pytest
import torch

from planner.frontend import zoo
from planner.frontend.trace import build_model, trace_model
from planner.frontend.shape import shape_from_traced
from planner.frontend.stages import compile_stages
from tests.passes.test_numerics import _check_lossless, _random_partition

FAMILIES = ("cohere2_moe", "deepseek_v2", "dots1", "exaone_moe", "glm4_moe", "glm4_moe_lite", "granitemoe",
            "gpt_oss", "granitemoeshared", "granitemoe_swa", "hunyuan_v1_moe", "minimax_m3_vl_text", "phimoe", "qwen2_moe")
# MLA families: one latent KV head per query head, as their real configs have
MLA = dict(num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
           v_head_dim=16)

# set wherever the family's config has the key
SMALL = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, expert_intermediate_size=32,
             shared_expert_intermediate_size=32, shared_intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128, num_experts=8,
             n_routed_experts=8, num_local_experts=8, num_experts_per_tok=2, moe_topk=2, first_k_dense_replace=0,
             n_group=1, topk_group=1, n_shared_experts=1, num_shared_experts=1, max_position_embeddings=512,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)


def small_config(model_type: str) -> dict:
    from transformers import AutoConfig

    defaults = AutoConfig.for_model(model_type).to_dict()
    small = dict(SMALL, **MLA) if "kv_lora_rank" in defaults else SMALL
    cfg = {k: v for k, v in small.items() if k in defaults}
    return dict(cfg, model_type=model_type, torch_dtype="float32")


@pytest.mark.parametrize("family", FAMILIES)
def test_unbundled_family_is_lossless(family):
    src = zoo.ModelSource(f"small-{family}", "test", small_config(family))
    model = build_model(src, device="cpu", seed=1)
    # transformers zero-initialises biases (gpt-oss's per-expert ones, routing biases): give every
    # all-zero tensor random values so that the split has to carry them right
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    traced = trace_model(model, src)
    shape = shape_from_traced(traced)
    assert shape.num_routed_experts == 8 and shape.num_moe_layers >= 1
    program = compile_stages(traced, shape, batch=2, seq=6)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    groups = _random_partition(8, 2, random.Random(family))
    _check_lossless(model, program, ids, prompt=6, groups=groups)


@pytest.mark.parametrize("family,fragment", [
    ("deepseek_v32", "past_key_values.update_indexer()"),  # sparse-attention indexer state in the cache
    ("jamba", "no list of decoder layers with attention"),  # Mamba layers
])
def test_unsupported_family_is_one_line_exit_2(family, fragment, tmp_path):
    import json

    from tests.conftest import assert_one_line_error, run_cli

    path = tmp_path / "config.json"
    path.write_text(json.dumps(small_config(family)))
    assert_one_line_error(run_cli("trace", str(path), "--stages"), fragment)
