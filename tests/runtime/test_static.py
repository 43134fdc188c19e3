"""Static buffers (the GPU path, run here on CPU processes): a preallocated KV cache written at device
positions, the mask over the whole cache, tokens kept on the device, and fixed-capacity dispatch
blocks whose overflow fails the run instead of dropping tokens."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from planner.frontend.trace import podplan_causal_mask
from runtime.errors import RankFailure
from runtime.kv import StaticKVCache
from runtime.launch import launch
from runtime.lower import static_causal_mask
from runtime.reference import check
from tests.runtime.conftest import colocated, disaggregated


def test_the_static_mask_is_the_growing_mask_over_the_written_positions():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4)
    for window in (0, 2):
        for past in (0, 5):
            grown = podplan_causal_mask(x, None, window, past)  # [B, 1, 3, past + 3]
            static = static_causal_mask(x, None, window, torch.tensor(past), capacity=12)
            assert static.shape == (2, 1, 3, 12)
            assert torch.equal(static[..., :past + 3], grown)
            assert (static[..., past + 3:] == torch.finfo(x.dtype).min).all()  # not yet written: hidden


def test_the_static_cache_writes_at_the_device_position_and_hands_over_what_it_wrote():
    pos = torch.zeros((), dtype=torch.int64)
    kv = StaticKVCache(8, pos)
    k1, v1 = torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4)
    k, _ = kv.update(k1, v1, 0)
    assert k.shape == (2, 1, 8, 4) and torch.equal(k[:, :, :3], k1) and not k[:, :, 3:].any()
    pos.fill_(3)
    k2 = torch.randn(2, 1, 1, 4)
    k, v = kv.update(k2, k2, 0)
    assert torch.equal(k[:, :, 3:4], k2) and torch.equal(k[:, :, :3], k1)
    kv.length = 4
    assert kv.layers[0][0].shape == (2, 1, 4, 4)


@pytest.mark.parametrize("make", [
    lambda: colocated("tiny-deepseek-v3", 2, microbatches=2, prompts=4, prompt_len=5, new_tokens=4),
    # remote shared experts: every token also sends a row to a shared-expert rank
    lambda: disaggregated("tiny-deepseek-v3", 1, 2, microbatches=2, prompts=5, prompt_len=4, new_tokens=4),
], ids=["colocated", "afd-remote-shared"])
def test_static_buffers_and_fixed_blocks_match_the_monolithic_model(make):
    spec = dataclasses.replace(make(), static=True)
    out = launch(spec, timeout_s=300)
    result = check(spec, out.tokens, out.logits)
    assert result.tokens_match and result.max_abs_diff <= 1e-4, result


def test_an_overflowing_dispatch_block_fails_the_run_naming_the_fix():
    # 4 expert ranks, blocks of 0.1 x the mean: the prefill's assignments cannot fit
    spec = dataclasses.replace(disaggregated("tiny-qwen3-moe", 1, 4, prompts=2, prompt_len=6, new_tokens=2),
                               capacity_factor=0.1)
    with pytest.raises(RankFailure, match=r"did not fit the fixed-capacity dispatch blocks; raise --capacity-factor"):
        launch(spec, timeout_s=300)


@pytest.mark.parametrize("model", ["tiny-qwen3-moe", "tiny-deepseek-v3"])
def test_experts_stored_for_grouped_mm_compute_the_same(model):
    """The GPU path re-stores expert weights [E, in, out] for torch._grouped_mm: same logits."""
    from planner.frontend.trace import build_model
    from planner.frontend.zoo import load_source
    from runtime.parts import grouped_layout

    m = build_model(load_source(model), device="cpu", seed=0)
    m.config._experts_implementation = "grouped_mm"
    ids = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = m(ids).logits
        assert grouped_layout([m]) == 2  # both MoE layers' experts
        after = m(ids).logits
    assert float((before - after).abs().max()) <= 1e-5
    assert grouped_layout([m]) == 0  # already stored that way
