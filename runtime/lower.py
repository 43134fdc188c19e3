"""Lower a rank's staged program to static buffers: the causal mask spans the preallocated cache.

The frontend routes every causal mask through `podplan_causal_mask(inputs_embeds, position_ids,
sliding_window, past_len)`, whose key axis grows with `past_len` (a host integer). With a
`runtime.kv.StaticKVCache` the keys are always `capacity` long and `past_len` is a device tensor;
`static_causal_mask` is the same mask over those keys (positions not yet written are hidden), and
`lower_masks` points every mask call of the program's stage modules at it. The rewrite is a graph
edit (torch.fx): the stage modules and their weights are otherwise unchanged.
"""

from __future__ import annotations

import torch
import torch.fx as fx

_FRONTEND_MASK = "podplan_causal_mask"
_ARGS = ("inputs_embeds", "position_ids", "sliding_window", "past_len")


def static_causal_mask(inputs_embeds: torch.Tensor, position_ids: torch.Tensor | None, sliding_window: int,
                       past_len: torch.Tensor | int = 0, capacity: int = 0) -> torch.Tensor:
    """Additive mask [B, 1, S, capacity]: query i (at its position) sees keys 0..position, within the window."""
    S = inputs_embeds.shape[1]
    if position_ids is None:
        position_ids = (torch.arange(S, device=inputs_embeds.device) + past_len)[None, :]
    q_pos = position_ids[:, :, None]
    k_pos = torch.arange(capacity, device=inputs_embeds.device)[None, None, :]
    allowed = k_pos <= q_pos
    if sliding_window > 0:
        allowed = allowed & (k_pos > q_pos - sliding_window)
    neg = torch.finfo(inputs_embeds.dtype).min
    mask = torch.zeros(allowed.shape, dtype=inputs_embeds.dtype, device=inputs_embeds.device).masked_fill(~allowed, neg)
    return mask[:, None, :, :].expand(inputs_embeds.shape[0], 1, S, capacity)


def lower_masks(gm: fx.GraphModule, capacity: int) -> int:
    """Point every causal-mask call in `gm` and its submodules at `static_causal_mask`; returns how many."""
    count = 0
    for module in gm.modules():
        if not isinstance(module, fx.GraphModule):
            continue
        changed = False
        for node in module.graph.nodes:
            if node.op == "call_function" and getattr(node.target, "__name__", "") == _FRONTEND_MASK:
                bound = dict(zip(_ARGS, node.args))
                bound.update(node.kwargs)
                node.target = static_causal_mask
                node.args = ()
                node.kwargs = {**bound, "capacity": capacity}
                changed = True
                count += 1
        if changed:
            module.recompile()
    return count
