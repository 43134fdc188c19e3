"""classify: give every node the stage it runs in, a (decoder layer, stage kind) pair.

Leaf modules take the stage of their role (attention, moe_gate, routed_experts, shared_experts,
dense_ffn; embed; lm_head -> head). Everything else (norms, residual adds, views, getitems, the
rotary embedding, masks, inputs) is glue and follows one rule, visited in graph order:

1. a glue node whose inputs all come from one stage joins that stage (the gate's getitems stay
   in moe_gate, attention's residual add and post-attention norm stay in attention);
2. a glue node mixing several stages joins the latest of them in program order, where an FFN-side
   stage (dense_ffn, routed_experts, shared_experts) of layer L counts as the attention stage of
   layer L+1 (head after the last layer): the combine `residual + experts + shared` is the opening
   of the next attention stage, so FFN stages stay pure and routed experts stay a sum over experts;
3. glue never runs in a stage before its own layer's attention (layer 0's input norm reads the
   embedding but belongs to layer 0's attention); glue with no inputs or no layer before the
   decoder layers is the embed stage (positions, mask, rotary embedding).

The result is checked: every edge must go forward in program order, else the structure is one this
rule cannot order and the error names the edge.
"""

from __future__ import annotations

import torch.fx as fx

from passes.errors import UnsupportedModelError
from passes import meta
from passes.context import PassContext
from passes.graphs import copy_module, program_order

NAME = "classify"
NEEDS = (meta.ROLE, meta.LAYER)
PROVIDES = (meta.STAGE, meta.STAGE_LAYER)

_LEAF_KIND = {
    "embed": "embed",
    "attention": "attention",
    "moe_gate": "moe_gate",
    "dense_ffn": "dense_ffn",
    "routed_experts": "routed_experts",
    "shared_experts": "shared_experts",
    "lm_head": "head",
}
_FFN_SIDE = ("dense_ffn", "routed_experts", "shared_experts")
_EMBED = meta.StageKey(None, "embed")
_HEAD = meta.StageKey(None, "head")


def _attention(layer: int, num_layers: int) -> meta.StageKey:
    return meta.StageKey(layer, "attention") if layer < num_layers else _HEAD


def _promote(key: meta.StageKey, num_layers: int) -> meta.StageKey:
    """An FFN-side stage's outputs are combined at the opening of the next layer's attention."""
    if key.kind in _FFN_SIDE:
        assert key.layer is not None, key
        return _attention(key.layer + 1, num_layers)
    return key


def _glue_stage(node: fx.Node, stage: dict[fx.Node, meta.StageKey], num_layers: int) -> meta.StageKey:
    def order(key: meta.StageKey) -> tuple[int, int]:
        return program_order(key, num_layers)

    inputs = {stage[a] for a in node.all_input_nodes}
    if not inputs:
        chosen = _EMBED
    elif len(inputs) == 1:
        chosen = next(iter(inputs))  # rule 1
    else:
        chosen = max((_promote(k, num_layers) for k in inputs), key=order)  # rule 2
    layer = meta.layer_of(node)
    if layer is not None and order(chosen) < order(_attention(layer, num_layers)):
        chosen = _attention(layer, num_layers)  # rule 3
    return chosen


def _leaf_stage(node: fx.Node) -> meta.StageKey | None:
    if node.op != "call_module":
        return None
    kind = _LEAF_KIND.get(meta.role_of(node))
    if kind is None:
        return None
    layer = meta.layer_of(node)
    if kind in ("embed", "head"):
        return meta.StageKey(None, kind)
    if layer is None:
        raise UnsupportedModelError(f"classify: {kind} module '{node.target}' is outside the decoder layers; cannot stage it")
    return meta.StageKey(layer, kind)


def _check_forward(graph: fx.Graph, stage: dict[fx.Node, meta.StageKey], num_layers: int) -> None:
    for node in graph.nodes:
        for arg in node.all_input_nodes:
            src, dst = stage[arg], stage[node]
            if program_order(src, num_layers) > program_order(dst, num_layers):
                raise UnsupportedModelError(
                    f"classify: '{arg.name}' in stage {src.name} feeds '{node.name}' in the earlier stage {dst.name}; "
                    "the stage-assignment rule cannot order this model's structure (see passes/classify.py)"
                )


def classify(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Set `podplan.stage` (kind) and `podplan.stage_layer` on every node."""
    out = copy_module(gm)
    num_layers = ctx.shape.num_layers
    stage: dict[fx.Node, meta.StageKey] = {}
    for node in out.graph.nodes:
        stage[node] = _leaf_stage(node) or _glue_stage(node, stage, num_layers)
    _check_forward(out.graph, stage, num_layers)
    for node, key in stage.items():
        node.meta[meta.STAGE] = key.kind
        node.meta[meta.STAGE_LAYER] = key.layer
    return out
