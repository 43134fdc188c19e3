"""annotate: shapes (ShapeProp on meta), parameters, FLOPs and bytes per token on every node."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from costmodels import opcount
from passes import meta
from passes.context import PassContext
from passes.graphs import copy_module, device_of, example_inputs

NAME = "annotate"
NEEDS = (meta.ROLE, meta.LAYER)
PROVIDES = (meta.COST,)

# Ops that only re-index or re-describe memory: no arithmetic.
_FREE = {operator.getitem, getattr, "view", "reshape", "unsqueeze", "squeeze", "expand", "contiguous", "transpose",
         "permute", "size", "to", "type", "float", "flatten", torch.arange}


def _metas(value) -> list[TensorMetadata]:
    if isinstance(value, TensorMetadata):
        return [value]
    if isinstance(value, (list, tuple)):
        return [m for v in value for m in _metas(v)]
    if isinstance(value, dict):
        return [m for v in value.values() for m in _metas(v)]
    return []


def _numel(tm: TensorMetadata) -> int:
    n = 1
    for d in tm.shape:
        n *= int(d)
    return n


def _nbytes(tm: TensorMetadata) -> int:
    return _numel(tm) * torch.empty((), dtype=tm.dtype, device="meta").element_size()


def _leaf_flops(role: str, mod: torch.nn.Module, params: int, ctx: PassContext) -> float:
    shape = ctx.shape
    if role == "attention":
        return opcount.attention_flops(shape, opcount.causal_mean_kv(ctx.seq, ctx.past))
    if role == "routed_experts":
        return opcount.routed_experts_flops(shape)
    if role in ("moe_gate", "dense_ffn", "shared_experts", "lm_head"):
        return opcount.matrix_params_flops(params)
    if role == "norm":
        return 4.0 * shape.hidden  # square, mean, rsqrt-scale, weight
    return 0.0


def annotate(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Attach a NodeCost to every node for the (batch, seq, past) signature of `ctx`."""
    out = copy_module(gm)  # same modules, own graph + metadata copy
    # Shapes with a cache need the KV inputs (kv-cache pass); without them, shapes are the prompt's
    # and ctx.past still enters the attention FLOPs below.
    past = ctx.past if out.meta.get(meta.KV_INPUTS) else 0
    args = example_inputs(out, ctx.batch, ctx.seq, past, device_of(out))
    with torch.no_grad():
        ShapeProp(out).propagate(*args)
    tokens = ctx.tokens
    for node in out.graph.nodes:
        outs = _metas(node.meta.get("tensor_meta"))
        ins = [m for a in node.all_input_nodes for m in _metas(a.meta.get("tensor_meta"))]
        params = weight_bytes = 0
        flops = 0.0
        role = meta.role_of(node)
        if node.op == "call_module":
            mod = out.get_submodule(str(node.target))
            params = sum(p.numel() for p in mod.parameters())
            weight_bytes = sum(p.numel() * p.element_size() for p in mod.parameters())
            flops = _leaf_flops(role, mod, params, ctx)
        elif node.op in ("call_function", "call_method") and node.target not in _FREE and outs:
            flops = sum(_numel(m) for m in outs) / tokens
        act = (sum(_nbytes(m) for m in ins) + sum(_nbytes(m) for m in outs)) / tokens
        node.meta[meta.COST] = meta.NodeCost(
            params=params,
            weight_bytes=weight_bytes,
            flops_per_token=float(flops),
            act_bytes_per_token=float(act),
            out_shapes=tuple(tuple(int(d) for d in m.shape) for m in outs),
            out_dtype=str(outs[0].dtype).replace("torch.", "") if outs else "",
        )
    return out
