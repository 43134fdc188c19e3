"""The staged program is lossless: stage by stage, experts spread over any partition of expert ids,
prefill and decode (with a KV cache), against transformers' monolithic model in fp32."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from passes.graphs import new_kv_cache
from planner.frontend import zoo
from planner.frontend.trace import build_model, trace_model
from planner.frontend.shape import shape_from_traced
from planner.frontend.stages import compile_stages, run_staged
from tests.passes.conftest import TINY, traced

TOL = 1e-6


def _random_partition(num_experts: int, groups: int, rng: random.Random) -> list[list[int]]:
    ids = list(range(num_experts))
    rng.shuffle(ids)
    cuts = sorted(rng.sample(range(1, num_experts), groups - 1)) if groups > 1 else []
    return [ids[a:b] for a, b in zip([0, *cuts], [*cuts, num_experts])]


def _check_lossless(model, program, ids: torch.Tensor, prompt: int, groups: list[list[int]]) -> None:
    """Prefill without cache, prefill with cache, then one decode step: all within TOL of transformers."""
    with torch.no_grad():
        ref_full = model(input_ids=ids, use_cache=False).logits
        ref_pre = model(input_ids=ids[:, :prompt], use_cache=True)
        ref_dec = model(input_ids=ids[:, prompt:prompt + 1], past_key_values=ref_pre.past_key_values, use_cache=True).logits

    full = run_staged(program, ids, expert_groups=groups)
    assert (full - ref_full).abs().max().item() <= TOL
    cache = new_kv_cache()
    pre = run_staged(program, ids[:, :prompt], cache=cache, expert_groups=groups)
    dec = run_staged(program, ids[:, prompt:prompt + 1], past_len=prompt, cache=cache, expert_groups=groups)
    assert (pre - ref_pre.logits).abs().max().item() <= TOL
    assert dec.shape == ref_dec.shape
    assert (dec - ref_dec).abs().max().item() <= TOL


@pytest.mark.parametrize("name", TINY)
def test_tiny_family_staged_is_lossless_in_both_phases(name):
    t, shape = traced(name, "cpu", 3)
    program = compile_stages(t, shape, batch=2, seq=6)
    rng = random.Random(name)
    groups = _random_partition(shape.num_routed_experts, 3, rng)
    ids = torch.randint(0, shape.vocab, (2, 8), generator=torch.Generator().manual_seed(11))
    _check_lossless(t.model, program, ids, prompt=6, groups=groups)


def test_every_expert_group_matters():
    """Dropping one device's experts changes the logits: the partition check above is not vacuous."""
    t, shape = traced("tiny-deepseek-v3", "cpu", 3)
    program = compile_stages(t, shape, batch=2, seq=6)
    ids = torch.randint(0, shape.vocab, (2, 6), generator=torch.Generator().manual_seed(5))
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    full = run_staged(program, ids, expert_groups=groups)
    from passes.expert_decompose import shard_stage
    from planner.frontend.stages import StageInterpreter

    runner = StageInterpreter(program, groups)
    for name in runner.shards:
        runner.shards[name] = [shard_stage(program.gm.get_submodule(name), groups[0])]
    with torch.no_grad():
        partial = runner.run(ids, 0, None)
    assert (partial - full).abs().max().item() > 1e-4


def test_bad_partitions_fail_with_one_line():
    from costmodels.errors import InputError

    t, shape = traced("tiny-mixtral", "cpu", 3)
    program = compile_stages(t, shape, batch=1, seq=4)
    ids = torch.zeros((1, 4), dtype=torch.long)
    with pytest.raises(InputError, match=r"expert 3 is in groups 0 and 1; groups must be disjoint"):
        run_staged(program, ids, expert_groups=[[0, 1, 2, 3], [3, 4, 5, 6, 7]])
    with pytest.raises(InputError, match=r"experts \[7\] are hosted nowhere"):
        run_staged(program, ids, expert_groups=[[0, 1, 2, 3], [4, 5, 6]])
    with pytest.raises(InputError, match=r"expert 9 in group 1 is out of range 0..7"):
        run_staged(program, ids, expert_groups=[[0, 1, 2, 3, 4, 5, 6, 7], [9]])


# --- property: random small configs of four families (shared experts on and off) --------------------


@st.composite
def configs(draw):
    family = draw(st.sampled_from(["mixtral", "qwen3_moe", "deepseek_v3", "qwen2_moe"]))
    heads = draw(st.sampled_from([2, 4]))
    head_dim = draw(st.sampled_from([8, 16]))
    experts = draw(st.integers(2, 8))
    layers = draw(st.integers(1, 3))
    cfg = {
        "model_type": family,
        "hidden_size": heads * head_dim,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": draw(st.sampled_from([1, heads])),
        "vocab_size": 96,
        "num_experts_per_tok": draw(st.integers(1, min(4, experts))),
        "intermediate_size": draw(st.sampled_from([16, 48])),
        "moe_intermediate_size": draw(st.sampled_from([8, 24])),
        "max_position_embeddings": 64,
        "torch_dtype": "float32",
    }
    if family == "mixtral":
        cfg["num_local_experts"] = experts
    elif family == "deepseek_v3":
        cfg.update(n_routed_experts=experts, n_shared_experts=draw(st.integers(1, 2)), n_group=1, topk_group=1,
                   first_k_dense_replace=draw(st.integers(0, layers - 1)), q_lora_rank=16, kv_lora_rank=8,
                   qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, num_key_value_heads=heads)
    else:
        cfg["num_experts"] = experts
        if family == "qwen2_moe":
            cfg["shared_expert_intermediate_size"] = draw(st.sampled_from([8, 24]))
    return cfg


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs(), groups=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_split_is_lossless_on_random_configs(cfg, groups, seed):
    src = zoo.ModelSource(name=f"prop-{cfg['model_type']}", origin="test", config=cfg)
    model = build_model(src, device="cpu", seed=seed)
    t = trace_model(model, src)
    shape = shape_from_traced(t)
    assert (shape.num_shared_experts > 0) == (cfg["model_type"] in ("deepseek_v3", "qwen2_moe"))
    program = compile_stages(t, shape, batch=2, seq=5)
    experts = shape.num_routed_experts
    partition = _random_partition(experts, min(groups, experts), random.Random(seed))
    ids = torch.randint(0, cfg["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(seed))
    _check_lossless(model, program, ids, prompt=5, groups=partition)


# --- families that mix full and sliding-window attention layers (one mask per kind) -----------------

SLIDING = {
    # Qwen2-MoE: layers from max_window_layers on use a window (here layer 1 of 2)
    "qwen2_moe": dict(model_type="qwen2_moe", use_sliding_window=True, sliding_window=3, max_window_layers=1,
                      num_experts=8, shared_expert_intermediate_size=24),
    # gpt-oss: alternating layers, attention sinks, expert biases, masks built without position ids
    "gpt_oss": dict(model_type="gpt_oss", sliding_window=3, num_local_experts=8, head_dim=8,
                    layer_types=["sliding_attention", "full_attention"]),
    # Cohere2-MoE: explicit layer_types
    "cohere2_moe": dict(model_type="cohere2_moe", sliding_window=3, num_experts=8,
                        layer_types=["sliding_attention", "full_attention"]),
}


@pytest.mark.parametrize("family", sorted(SLIDING))
def test_sliding_window_families_are_lossless_with_a_window_that_bites(family):
    cfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
               num_experts_per_tok=2, intermediate_size=48, moe_intermediate_size=16, max_position_embeddings=64,
               torch_dtype="float32", pad_token_id=0, bos_token_id=1, eos_token_id=2, **SLIDING[family])
    src = zoo.ModelSource(name=f"sliding-{family}", origin="test", config=cfg)
    model = build_model(src, device="cpu", seed=4)
    assert "sliding_attention" in model.config.layer_types and "full_attention" in model.config.layer_types
    t = trace_model(model, src)
    masks = [n for n in t.gm.graph.nodes if getattr(n.target, "__name__", "") == "podplan_causal_mask"]
    assert len(masks) == 2
    shape = shape_from_traced(t)
    program = compile_stages(t, shape, batch=2, seq=7)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    # 8 prompt tokens and a window of 3: the window cuts keys in prefill and in decode
    _check_lossless(model, program, ids, prompt=8, groups=_random_partition(8, 2, random.Random(family)))
    # and it matters: the same weights with a window wider than the sequence give other logits
    full = build_model(zoo.ModelSource(src.name, "test", dict(cfg, sliding_window=64)), device="cpu", seed=4)
    with torch.no_grad():
        assert (full(input_ids=ids, use_cache=False).logits - model(input_ids=ids, use_cache=False).logits
                ).abs().max().item() > 1e-4
