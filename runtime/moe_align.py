"""Lay a step's (token, expert) assignments out as expert-sorted rows in blocks of one expert each.

The routed-experts kernels (`runtime.moe_triton`) run one program per (row block, column block):
every block of `block` rows belongs to one expert, so the program streams that expert's weights once
for all of its rows. This module computes that layout with tensor operations only: no host read-back
and no data-dependent shapes, so a decode step that routes with it can be captured as a CUDA graph.
The buffer is sized for the worst case (every expert's group padded to a whole block); blocks past
the last used row carry expert -1 and are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Up to this many assignments the rank of each within its expert comes from a one-hot prefix sum
# (a few small kernels); above it, from a stable sort (one-hot would be assignments x experts large).
ONE_HOT_MAX = 4096


@dataclass
class BlockLayout:
    """Where each assignment goes in the padded, expert-sorted row buffer."""

    dest: torch.Tensor  # [A] int64: the buffer row of assignment a (a = token * k + j)
    block_expert: torch.Tensor  # [R / block] int32: the expert of each row block, -1 past the last used row
    rows: int  # R: the buffer's rows (a multiple of block)
    block: int


def padded_rows(assignments: int, num_experts: int, block: int) -> int:
    """The buffer's rows in the worst case: every touched expert's group rounded up to a whole block."""
    worst = assignments + min(num_experts, assignments) * (block - 1)
    return -(-worst // block) * block


def block_layout(expert_ids: torch.Tensor, num_experts: int, block: int) -> BlockLayout:
    """The layout of assignments `expert_ids` (any shape, values in 0..E-1, flattened in order)."""
    ids = expert_ids.reshape(-1)
    A = ids.numel()
    if A <= ONE_HOT_MAX:
        # [A, E]: assignments so far of each expert (a comparison, not F.one_hot: that may check its
        # input's range on the host, which a CUDA graph cannot capture)
        seen = (ids[:, None] == torch.arange(num_experts, device=ids.device)[None, :]).cumsum(0)
        counts = seen[-1]
        rank = seen.gather(1, ids[:, None]).squeeze(1) - 1  # earlier assignments to the same expert
    else:
        counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device).scatter_add_(0, ids, torch.ones_like(ids))
        order = torch.sort(ids, stable=True).indices
        start = counts.cumsum(0) - counts
        rank = torch.empty_like(ids)
        rank[order] = torch.arange(A, device=ids.device) - start[ids[order]]
    padded = (counts + block - 1) // block * block
    end = padded.cumsum(0)
    dest = (end - padded)[ids] + rank
    R = padded_rows(A, num_experts, block)
    starts = torch.arange(0, R, block, device=ids.device)
    owner = torch.searchsorted(end, starts, right=True)  # the expert whose padded range holds the block's first row
    block_expert = torch.where(owner < num_experts, owner, -1).to(torch.int32)
    return BlockLayout(dest, block_expert, R, block)


def scatter_rows(layout: BlockLayout, hidden: torch.Tensor, top_k: int, weights: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The padded input rows [R, H] (token t's row copied to each of its k assignments; padding rows are 0)
    and the routing weight of each row [R] (0 on padding rows)."""
    rows = hidden.new_zeros(layout.rows, hidden.shape[-1])
    rows[layout.dest] = hidden.repeat_interleave(top_k, dim=0)
    w = weights.new_zeros(layout.rows, dtype=torch.float32)
    w[layout.dest] = weights.reshape(-1).float()
    return rows, w


def gather_tokens(layout: BlockLayout, out_rows: torch.Tensor, tokens: int, top_k: int) -> torch.Tensor:
    """Each token's sum over its k (already weighted) expert rows: [R, H] -> [tokens, H]."""
    return out_rows[layout.dest].view(tokens, top_k, -1).sum(dim=1)


def block_matmul_reference(rows: torch.Tensor, layout: BlockLayout, weight: torch.Tensor) -> torch.Tensor:
    """What the kernels compute, in plain torch (a CPU check of the layout): each block's rows times its
    expert's weight [E, N, K] (transposed); blocks of expert -1 give zeros."""
    out = rows.new_zeros(layout.rows, weight.shape[1])
    for b, e in enumerate(layout.block_expert.tolist()):
        if e >= 0:
            sl = slice(b * layout.block, (b + 1) * layout.block)
            out[sl] = rows[sl] @ weight[e].T
    return out
