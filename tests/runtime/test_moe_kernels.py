"""The routed-experts fast path: the block layout (CPU, in CI) and the Triton kernels (GPU only)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import runtime.moe_align as moe_align
from runtime.moe_align import block_layout, block_matmul_reference, gather_tokens, padded_rows, scatter_rows


def _loop_reference(x, ids, w, w1, w2):
    """Per token, per chosen expert: the SwiGLU expert, weighted and summed (the definition)."""
    inter = w2.shape[2]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            g, u = (w1[e] @ x[t]).split(inter)
            out[t] += w[t, j] * (w2[e] @ (F.silu(g) * u))
    return out


@pytest.mark.parametrize("one_hot_max", [4096, 0])  # the prefix-sum ranks and the stable-sort ranks
@pytest.mark.parametrize("tokens,block", [(1, 4), (7, 4), (33, 8), (64, 16)])
def test_block_layout_computes_the_experts(monkeypatch, one_hot_max, tokens, block):
    monkeypatch.setattr(moe_align, "ONE_HOT_MAX", one_hot_max)
    g = torch.Generator().manual_seed(tokens)
    E, H, inter, k = 8, 16, 12, 3
    w1, w2 = torch.randn(E, 2 * inter, H, generator=g), torch.randn(E, H, inter, generator=g)
    x = torch.randn(tokens, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(tokens)])
    w = torch.rand(tokens, k, generator=g)
    layout = block_layout(ids, E, block)
    rows, rw = scatter_rows(layout, x, k, w)
    h = block_matmul_reference(rows, layout, w1)
    out = block_matmul_reference(F.silu(h[:, :inter]) * h[:, inter:], layout, w2) * rw[:, None]
    got = gather_tokens(layout, out, tokens, k)
    torch.testing.assert_close(got, _loop_reference(x, ids, w, w1, w2), rtol=1e-4, atol=1e-4)


def test_block_layout_gives_each_block_one_expert_and_skips_the_tail():
    ids = torch.tensor([[1, 2], [2, 0], [2, 1]])
    layout = block_layout(ids, num_experts=4, block=2)
    assert layout.rows == padded_rows(6, 4, 2) == 10
    # expert 0: rows 0-1, expert 1: rows 2-3, expert 2: rows 4-7 (3 rows, padded to 4), then unused blocks
    assert layout.block_expert.tolist() == [0, 1, 2, 2, -1]
    assert layout.dest.tolist() == [2, 4, 5, 0, 6, 3]
    assert len(set(layout.dest.tolist())) == 6  # no two assignments share a row


def test_fused_rms_norm_matches_the_modules_it_replaces():
    from planner.frontend.trace import build_model
    from planner.frontend.zoo import load_source
    from runtime.fast_paths import fuse_rms_norms

    model = build_model(load_source("tiny-qwen3-moe"), device="cpu", seed=0)
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        n = fuse_rms_norms(model)
        got = model(input_ids=ids).logits
    assert n >= 2 * model.config.num_hidden_layers + 1  # two per layer and the final norm (q/k norms too)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_fused_rms_norm_keeps_a_norm_it_does_not_reproduce():
    from runtime.fast_paths import fuse_rms_norms

    class OffsetRMSNorm(torch.nn.Module):  # Gemma-style (1 + weight): not the plain RMSNorm
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(8))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            return (1 + self.weight) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    assert fuse_rms_norms(torch.nn.Sequential(OffsetRMSNorm())) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tokens", [1, 32, 512, 600])  # one-program layout (BM 16, 32, 64), then the torch layout
@pytest.mark.parametrize("transposed", [False, True])
def test_triton_experts_match_grouped_mm(tokens, transposed):
    pytest.importorskip("triton", reason="Triton is not installed (the GPU image has it)")
    from transformers.integrations.moe import grouped_mm_experts_forward

    from runtime.moe_triton import supports, triton_experts_forward

    class Experts(torch.nn.Module):  # the attributes transformers' experts decorator sets
        def __init__(self, E, H, inter):
            super().__init__()
            self.num_experts, self.hidden_dim, self.intermediate_dim = E, H, inter
            self.gate_up_proj = torch.nn.Parameter(torch.randn(E, 2 * inter, H, device="cuda", dtype=torch.bfloat16) * 0.05)
            self.down_proj = torch.nn.Parameter(torch.randn(E, H, inter, device="cuda", dtype=torch.bfloat16) * 0.05)
            self.act_fn = torch.nn.SiLU()
            self.has_gate, self.has_bias, self.is_concatenated, self.has_post_expert_norm = True, False, True, False
            self.is_transposed, self._is_expert_parallel = False, False

        def _apply_gate(self, gate_up):
            gate, up = gate_up.chunk(2, dim=-1)
            return self.act_fn(gate) * up

    Experts._apply_gate.__name__ = "_default_apply_gate"
    torch.manual_seed(0)
    m = Experts(16, 256, 128)
    if transposed:
        with torch.no_grad():
            m.gate_up_proj = torch.nn.Parameter(m.gate_up_proj.transpose(1, 2).contiguous())
            m.down_proj = torch.nn.Parameter(m.down_proj.transpose(1, 2).contiguous())
        m.is_transposed = True
    assert supports(m)
    x = torch.randn(tokens, 256, device="cuda", dtype=torch.bfloat16)
    w, ids = torch.topk(torch.randn(tokens, 16, device="cuda").softmax(-1), 4, dim=-1)
    w = (w / w.sum(-1, keepdim=True)).to(torch.bfloat16)
    with torch.no_grad():
        want = grouped_mm_experts_forward(m, x, ids, w).float()
        got = triton_experts_forward(m, x, ids, w).float()
    assert (got - want).abs().max().item() <= 2e-2 * want.abs().max().item()
