"""Which physical slot serves each (token, expert) pair: replicas chosen by weighted shares.

A token routed to logical expert e goes to one of e's replicas. The choice is a deterministic
function of the token's identity (prompt id, position), so it does not depend on how sequences
are split over ranks or microbatches, and over many tokens each replica gets its share.
"""

from __future__ import annotations

import torch

from runtime.spec import LayerSlots

# Golden-ratio increments give a low-discrepancy sequence in [0, 1): consecutive tokens spread
# evenly over the cumulative shares (Weyl sequence).
_PHI = 0.6180339887498949
# Token identity = prompt id * _POS_STRIDE + position (prompts are far shorter than this).
POS_STRIDE = 1 << 20


def token_keys(seq_ids: list[int], start: int, length: int) -> torch.Tensor:
    """[len(seq_ids) * length] int64 keys of the rows of a [b, length] batch at positions start.."""
    seqs = torch.tensor(seq_ids, dtype=torch.int64)[:, None]
    pos = torch.arange(start, start + length, dtype=torch.int64)[None, :]
    return (seqs * POS_STRIDE + pos).reshape(-1)


def uniform_of(keys: torch.Tensor) -> torch.Tensor:
    """[T] float64 in [0, 1): the replica-choice variable of each token."""
    return torch.frac((keys.to(torch.float64) + 0.5) * _PHI)


class ReplicaTable:
    """log2phy with cumulative shares for one layer: picks the slot of each (token, expert) pair.

    slots: [E, X] slot ids of each expert's replicas (padded with the last replica);
    cum: [E, X] cumulative shares (padded with +inf, last real entry forced to 1).
    """

    def __init__(self, lp: LayerSlots, num_experts: int):
        reps: list[list[int]] = [[] for _ in range(num_experts)]
        for s, e in enumerate(lp.phy2log):
            reps[e].append(s)
        width = max(len(r) for r in reps)
        self.slots = torch.zeros((num_experts, width), dtype=torch.int64)
        self.cum = torch.full((num_experts, width), float("inf"), dtype=torch.float64)
        for e, r in enumerate(reps):
            acc = 0.0
            total = sum(lp.shares[s] for s in r)
            for i, s in enumerate(r):
                acc += lp.shares[s] / total
                self.slots[e, i] = s
                self.cum[e, i] = acc
            self.cum[e, len(r) - 1] = 1.0  # rounding must never leave u above the last bound
            self.slots[e, len(r):] = r[-1]

    def to(self, device: torch.device) -> ReplicaTable:
        """The table on `device`, so picking needs no copy of the routing ids to the host."""
        self.slots, self.cum = self.slots.to(device), self.cum.to(device)
        return self

    def pick(self, expert_ids: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Slots [T, k] for expert ids [T, k] and per-token uniforms u [T], on the table's device."""
        ids = expert_ids.to(torch.int64)
        cum = self.cum[ids]  # [T, k, X]
        idx = (u[:, None, None] >= cum).sum(-1).clamp(max=self.slots.shape[1] - 1)
        return torch.gather(self.slots[ids], 2, idx[..., None]).squeeze(-1)
