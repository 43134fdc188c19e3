"""cut-analysis: every value crossing a stage boundary, its kind, shape and bytes per token on the wire.

Read off the staged graph: a stage's placeholders carry the metadata (shape propagation included)
of the node that produced the value in the unsplit graph, so no shapes are recomputed here.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import TensorMetadata

from passes import meta
from passes.context import PassContext
from passes.graphs import PAST_KEY_VALUES, copy_module, stage_calls, stage_module

NAME = "cut-analysis"
NEEDS = (meta.STAGED, meta.COST)
PROVIDES = (meta.CUTS,)

# Wire formats. Token ids and expert ids travel as int32 and routing weights as fp32, as in the
# dispatch message size formula of costmodels/opcount.py (dispatch_bytes_per_token: 4 + 4 per
# destination). Activations: 2 bytes in BF16; 1 byte in INT8 plus one fp32 scale per token and copy
# (CloudMatrix-Infer's INT8 dispatch, "7,168 + scale" per token: [CMI] in cloudmatrix384.md §3).
_INT_BYTES = 4
_WEIGHT_BYTES = 4
_BF16_BYTES = 2
_INT8_BYTES = 1
_INT8_SCALE_BYTES = 4

_FFN_SIDE = ("dense_ffn", "routed_experts", "shared_experts")
_OUT_KIND = {"routed_experts": "expert_out", "shared_experts": "shared_out", "dense_ffn": "ffn_out"}
PROGRAM_INPUT = "input"  # `src` of values that enter the program (input_ids, past_len, the cache)


def _tensor_metas(value) -> list[TensorMetadata]:
    if isinstance(value, TensorMetadata):
        return [value]
    if isinstance(value, (list, tuple)):
        return [m for v in value for m in _tensor_metas(v)]
    return []


def _kind(node: fx.Node, src: str | meta.StageKey, dst: meta.StageKey, metas: list[TensorMetadata]) -> str:
    if not metas:
        return "state" if node.name == PAST_KEY_VALUES else "scalar"
    if src == PROGRAM_INPUT:
        return "input"
    assert isinstance(src, meta.StageKey)
    if src.kind == "embed":
        return "residual" if meta.role_of(node) == "embed" else "context"
    if src.kind == "moe_gate":
        return "routing_weights" if metas[0].dtype.is_floating_point else "routing_ids"
    if src.kind in _OUT_KIND:
        return _OUT_KIND[src.kind]
    if dst.kind in _FFN_SIDE or dst.kind == "moe_gate":
        return "hidden"
    return "residual"


def _bytes(kind: str, metas: list[TensorMetadata], tokens: int, fanout: int) -> tuple[float, float]:
    """(BF16, INT8) bytes per token for `fanout` copies of the value."""
    bf16 = int8 = 0.0
    for tm in metas:
        per_token = tm.shape.numel() / tokens
        if not tm.dtype.is_floating_point:
            bf16 += per_token * _INT_BYTES
            int8 += per_token * _INT_BYTES
        elif kind == "routing_weights":
            bf16 += per_token * _WEIGHT_BYTES
            int8 += per_token * _WEIGHT_BYTES
        else:
            bf16 += per_token * _BF16_BYTES
            int8 += per_token * _INT8_BYTES + _INT8_SCALE_BYTES
    return round(fanout * bf16, 3), round(fanout * int8, 3)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def cut_analysis(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Record a CutTensor for every (value, source stage, destination stage) of the staged program."""
    out = copy_module(gm)
    cuts: list[meta.CutTensor] = []
    for call, dst in stage_calls(out):
        inputs = [n for n in stage_module(out, call).graph.nodes if n.op == "placeholder"]
        for arg, inner in zip(call.args, inputs):
            assert isinstance(arg, fx.Node)
            src = PROGRAM_INPUT if arg.op == "placeholder" else meta.stage_key_of(arg)
            metas = _tensor_metas(inner.meta.get("tensor_meta"))
            kind = _kind(inner, src, dst, metas)
            experts_edge = kind == "hidden" and dst.kind == "routed_experts"
            fanout = ctx.shape.top_k if experts_edge or kind == "expert_out" else 1
            bf16, int8 = _bytes(kind, metas, ctx.tokens, fanout)
            cuts.append(meta.CutTensor(
                src=src if isinstance(src, str) else src.name,
                dst=dst.name,
                value=inner.name,
                kind=kind,
                shapes=tuple(tuple(int(d) for d in tm.shape) for tm in metas),
                dtype=_dtype_name(metas[0].dtype) if metas else ("object" if kind == "state" else "int"),
                fanout=fanout,
                bytes_bf16=bf16,
                bytes_int8=int8,
            ))
    out.meta[meta.CUTS] = tuple(cuts)
    return out
