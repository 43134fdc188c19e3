"""kv-cache: make positions and the KV cache graph inputs, so one graph serves prefill and decode.

The frontend traces `forward(input_ids)` with no cache: positions are `arange(S)` and the causal
mask spans the S new tokens only. This pass adds two inputs after `input_ids`:

- `past_len` (int, default 0): tokens already in the cache; positions become `past_len + arange(S)`
  and the mask spans `past_len + S` keys;
- `past_key_values` (default None): an object with transformers' cache protocol
  (`update(key, value, layer_idx) -> (keys, values)`: `passes.graphs.KVCache`, or transformers'
  own `DynamicCache()`), handed to every attention module, which appends its layer's new keys and
  values and attends over all of them.

With the defaults the graph computes exactly what it did before. After the split, each attention
stage receives the cache object as an input: a worker passes the cache it holds for its layers.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from passes.errors import UnsupportedModelError
from passes import meta
from passes.context import PassContext
from passes.graphs import PAST_KEY_VALUES, PAST_LEN, copy_module

NAME = "kv-cache"
NEEDS = (meta.ROLE, meta.LAYER)
PROVIDES = (meta.KV_INPUTS,)

# The frontend's mask function (planner.frontend.trace.podplan_causal_mask), found by name: passes do not
# import the planner. Its arguments are (inputs_embeds, position_ids, sliding_window, past_len=0);
# this pass reuses the node's own target and feeds it the new `past_len` input.
_FRONTEND_MASK = "podplan_causal_mask"


def cached_positions(inputs_embeds: torch.Tensor, past_len: int) -> torch.Tensor:
    """Position ids [1, S] of the S new tokens that follow `past_len` cached ones."""
    return (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_len).unsqueeze(0)


def _frontend_masks(graph: fx.Graph) -> list[fx.Node]:
    """The mask calls: one, or one per attention kind (families mixing full and sliding-window layers)."""
    masks = [n for n in graph.nodes if n.op == "call_function" and getattr(n.target, "__name__", "") == _FRONTEND_MASK]
    if not masks:
        raise UnsupportedModelError(
            f"kv-cache: no '{_FRONTEND_MASK}' node in the traced graph; trace the model with planner.frontend.trace "
            "(it routes every causal mask through that function)"
        )
    if len({n.args[1] for n in masks}) != 1:
        raise UnsupportedModelError(f"kv-cache: the {len(masks)} causal masks use different position ids; this family "
                          "builds its masks in a way podplan does not cache")
    return masks


def _erase_dead(node: fx.Node) -> None:
    """Erase `node` and then its inputs, while they have no users left (the old position-id chain)."""
    if node.users or node.op in ("placeholder", "output", "call_module"):
        return
    inputs = list(node.all_input_nodes)
    node.graph.erase_node(node)
    for arg in inputs:
        _erase_dead(arg)


def _tag(node: fx.Node, like: fx.Node) -> fx.Node:
    node.meta[meta.ROLE] = "other"
    node.meta[meta.LAYER] = None
    node.meta[meta.MODULE] = like.meta.get(meta.MODULE, "")
    return node


def kv_cache(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Add `past_len` and `past_key_values` inputs; positions, the mask and attention use them."""
    out = copy_module(gm)
    graph = out.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if any(str(n.target) in (PAST_LEN, PAST_KEY_VALUES) for n in placeholders):
        return out  # already rewritten: the pass is idempotent
    with graph.inserting_after(placeholders[-1]):
        past_len = _tag(graph.placeholder(PAST_LEN, type_expr=int, default_value=0), placeholders[0])
    with graph.inserting_after(past_len):
        cache = _tag(graph.placeholder(PAST_KEY_VALUES, default_value=None), placeholders[0])

    masks = _frontend_masks(graph)
    attentions = [n for n in graph.nodes if n.op == "call_module" and meta.role_of(n) == "attention"]
    embeds, old_positions = masks[0].args[0], masks[0].args[1]
    if old_positions is None and attentions:
        # a family that builds its masks without position ids (gpt-oss): the positions are the ones
        # its attention (rotary embedding) is given
        old_positions = attentions[0].kwargs.get("position_ids")
    if not isinstance(old_positions, fx.Node):
        raise UnsupportedModelError("kv-cache: neither the causal mask nor the attention takes position ids; this family's "
                          "model forward is not one podplan can cache")
    with graph.inserting_before(masks[0]):
        positions = _tag(graph.call_function(cached_positions, (embeds, past_len)), masks[0])
    for mask in masks:
        mask_fn = mask.target
        assert callable(mask_fn), "_frontend_masks returns call_function nodes, whose target is the function"
        with graph.inserting_before(mask):
            new_mask = _tag(graph.call_function(mask_fn, (mask.args[0], positions, mask.args[2], past_len)), mask)
        mask.replace_all_uses_with(new_mask)
        graph.erase_node(mask)
    old_positions.replace_all_uses_with(positions)
    _erase_dead(old_positions)

    for node in attentions:
        if PAST_KEY_VALUES not in node.kwargs:
            raise UnsupportedModelError(
                f"kv-cache: attention node '{node.name}' ({node.target}) is not called with a "
                f"'{PAST_KEY_VALUES}' keyword; this family's decoder layer passes the cache differently"
            )
        node.kwargs = {**node.kwargs, PAST_KEY_VALUES: cache}
    graph.lint()
    out.recompile()
    out.meta[meta.KV_INPUTS] = True
    return out
