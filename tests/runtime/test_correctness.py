"""Multi-process runs on gloo give the monolithic model's greedy tokens and logits (fp32, within 1e-4).

Every bundled tiny family, colocated and disaggregated attention/experts, with one and two
microbatches; then prefill/decode instances with the KV cache handed over, a compiled-style plan
on 8 processes, and a safetensors checkpoint. Workers are forked from a preloaded server, so a
4-process run costs about a second once the first one has started it.
"""

from __future__ import annotations

import pytest
import torch

from runtime.from_plan import spec_from_plan
from runtime.launch import launch
from runtime.reference import check, greedy
from runtime.spec import RunSpec
from tests.runtime.conftest import FAMILIES, colocated, disaggregated, instance

pytestmark = pytest.mark.slow

RUN = dict(prompts=5, prompt_len=5, new_tokens=3, seed=2)


def _assert_matches(spec: RunSpec):
    out = launch(spec, timeout_s=120)
    result = check(spec, out.tokens, out.logits)
    assert result.tokens_match, (out.tokens, greedy(spec)[0])
    assert result.max_abs_diff <= 1e-4, result
    assert (out.tokens >= 0).all()
    return out


@pytest.mark.parametrize("microbatches", [1, 2])
@pytest.mark.parametrize("model", FAMILIES)
def test_colocated(model, microbatches):
    # 3 slots per rank over 4 ranks: 12 slots for 8 experts, so 4 experts have 2 replicas (2:1 shares)
    out = _assert_matches(colocated(model, 4, microbatches=microbatches, slots_per_rank=3, shares="skewed", **RUN))
    assert all(m["role"] == "both" for m in out.metrics)
    assert sum(m["expert_rows"] for m in out.metrics) > 0


@pytest.mark.parametrize("microbatches", [1, 2])
@pytest.mark.parametrize("model", FAMILIES)
def test_disaggregated(model, microbatches):
    spec = disaggregated(model, 2, 2, microbatches=microbatches, slots_per_rank=5, **RUN)
    out = _assert_matches(spec)
    by_rank = {m["rank"]: m for m in out.metrics}
    assert by_rank[0]["role"] == "attention" and by_rank[2]["role"] == "experts"
    assert by_rank[0]["expert_rows"] == 0 and by_rank[2]["expert_rows"] > 0  # attention ranks compute no experts
    assert by_rank[2]["tokens"] == 0 and by_rank[0]["bytes_sent"] > 0


def test_prefill_decode_instances_hand_over_the_kv_cache():
    model = "tiny-deepseek-v3"  # MLA caches compressed latents; shared experts on the decode expert ranks
    pre = instance(model, "prefill-0", ("prefill",), [0, 1], [0, 1], microbatches=2)
    dec = instance(model, "decode-0", ("decode",), [2, 3, 4], [5, 6], microbatches=2, shared=[5, 6])
    out = _assert_matches(RunSpec(model, 7, (pre, dec), **RUN))
    by_rank = {m["rank"]: m for m in out.metrics}
    assert by_rank[0]["clock"].get("kv_transfer", 0) > 0 and by_rank[2]["clock"].get("kv_transfer", 0) > 0
    assert by_rank[0]["steps"].keys() == {"prefill"} and by_rank[2]["steps"].keys() == {"decode"}


def test_synthetic_plan_on_eight_processes():
    from tests.plan_factory import tiny_plan

    plan = tiny_plan("tiny-olmoe", decode_mode="disaggregated", weighted=True, microbatches=2)
    spec = spec_from_plan(plan, prompts=6, prompt_len=4, new_tokens=3)
    assert spec.world_size == 8 and spec.disaggregated_pd
    _assert_matches(spec)


def test_safetensors_weights(tmp_path):
    from safetensors.torch import save_file

    from runtime.parts import build_full

    _, model = build_full(RunSpec("tiny-mixtral", 1, (), seed=7))
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    spec = colocated("tiny-mixtral", 2, **dict(RUN, seed=0), weights=str(path))
    out = _assert_matches(spec)
    _, plain_logits, _ = greedy(colocated("tiny-mixtral", 2, **dict(RUN, seed=0)))
    assert not torch.allclose(out.logits, plain_logits)  # the checkpoint's weights, not seed 0's


def test_every_golden_local_plan_runs_and_matches():
    """The golden plans compiled for local:N are executable: run each and check it against the model."""
    from planner.ir.plan import load_plan
    from tests.conftest import ROOT

    paths = sorted((ROOT / "plans").glob("*.local-*.json"))
    assert paths, "plans/ holds no local:N golden plan (planner/golden.py should list a tiny model on local:8)"
    for path in paths:
        _assert_matches(spec_from_plan(load_plan(path), prompts=4, prompt_len=4, new_tokens=3))


@pytest.mark.parametrize("shared", [[0, 1], [2, 3]], ids=["shared-on-attention", "shared-on-experts"])
def test_a_sliding_window_family_from_a_config_path(tmp_path, shared):
    """Qwen2-MoE with layer 1 windowed to 3 keys (not bundled): the runtime masks each layer as its kind wants.

    Its shared expert is gated (two modules and a sigmoid), all in one shared-experts stage with one
    input, so it also runs on other devices than the attention."""
    import json

    cfg = dict(model_type="qwen2_moe", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=96, num_experts=8, num_experts_per_tok=2, intermediate_size=48,
               moe_intermediate_size=16, shared_expert_intermediate_size=24, max_position_embeddings=64,
               use_sliding_window=True, sliding_window=3, max_window_layers=1, torch_dtype="float32",
               pad_token_id=0, bos_token_id=1, eos_token_id=2)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    inst = instance(str(path), "afd-0", ("prefill", "decode"), [0, 1], [2, 3], microbatches=2, slots_per_rank=5,
                    shared=shared)
    out = _assert_matches(RunSpec(str(path), 4, (inst,), prompts=4, prompt_len=6, new_tokens=4, seed=1))
    # the ranks that ran the shared-experts stage module are the ones the spec names
    assert {m["rank"] for m in out.metrics if "layer0_shared_experts" in m["stage_clock"]} == set(shared)


def test_gpt_oss_with_expert_biases_and_sinks(tmp_path):
    """gpt-oss: per-expert biases travel with their slots, attention sinks stay in attention, a 3-key window."""
    import json

    cfg = dict(model_type="gpt_oss", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, vocab_size=96, num_local_experts=8, num_experts_per_tok=2,
               intermediate_size=16, max_position_embeddings=64, sliding_window=3,
               layer_types=["sliding_attention", "full_attention"], torch_dtype="float32", pad_token_id=0,
               eos_token_id=2)
    from safetensors.torch import save_file

    from runtime.parts import build_full

    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    # transformers initialises the expert biases to zero: a checkpoint with random ones makes a wrong
    # slicing of them visible
    _, model = build_full(RunSpec(str(path), 1, (), seed=1))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    biases = [k for k in state if k.endswith(("gate_up_proj_bias", "down_proj_bias"))]
    assert len(biases) == 4
    for k in biases:
        state[k] = torch.randn(state[k].shape, generator=gen) * 0.5
    weights = tmp_path / "w.safetensors"
    save_file(state, str(weights))
    # 5 slots per expert rank over 2 ranks: replicated experts, so biases are copied as well as split
    _assert_matches(disaggregated(str(path), 2, 2, microbatches=2, slots_per_rank=5, prompts=4, prompt_len=6,
                                  new_tokens=4, seed=1, weights=str(weights)))
