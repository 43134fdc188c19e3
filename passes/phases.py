"""phases: the staged program's stage signatures for prefill and for one decode step.

Prefill: `batch` sequences of S new tokens, empty cache. Decode: one new token per sequence after
K cached ones. S = ctx.seq; K = ctx.past if set, else S (the first decode step after that
prefill); both can be overridden with ctx.options["phases"] = {"prefill_seq": S, "decode_kv": K}.
The program is run once per phase (on meta for full-size models: shapes only) and the values at
every stage boundary are recorded; the graph itself is not changed.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from costmodels.errors import InputError
from passes import meta
from passes.context import PassContext
from passes.graphs import PAST_KEY_VALUES, PAST_LEN, copy_module, device_of, example_inputs, new_kv_cache, stage_calls

NAME = "phases"
NEEDS = (meta.STAGED, meta.KV_INPUTS)
PROVIDES = (meta.PHASES,)


def _sig(name: str, value: object) -> meta.TensorSig:
    if isinstance(value, torch.Tensor):
        return meta.TensorSig(name, tuple(int(d) for d in value.shape), str(value.dtype).replace("torch.", ""))
    return meta.TensorSig(name, None, type(value).__name__)


def _flat(name: str, value: object) -> list[meta.TensorSig]:
    if isinstance(value, (tuple, list)):
        return [s for i, v in enumerate(value) for s in _flat(f"{name}[{i}]", v)]
    return [_sig(name, value)]


class _BoundaryRecorder(fx.Interpreter):
    """Runs the top-level graph and keeps every stage call's inputs and outputs (as signatures)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.stages: list[meta.StageSignature] = []

    def call_module(self, target, args, kwargs):
        result = super().call_module(target, args, kwargs)
        graph = self.module.get_submodule(target).graph
        inner = [n.name for n in graph.nodes if n.op == "placeholder"]
        outer = [n.name for n in graph.output_node().args[0]]
        inputs = tuple(s for name, a in zip(inner, args) for s in _flat(name, a))
        outputs = tuple(s for name, r in zip(outer, result) for s in _flat(name, r))
        self.stages.append(meta.StageSignature(str(target), inputs, outputs))
        return result


def _record(gm: fx.GraphModule, args: list) -> tuple[meta.StageSignature, ...]:
    recorder = _BoundaryRecorder(gm)
    with torch.no_grad():
        recorder.run(*args)
    return tuple(recorder.stages)


def phases(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Record PhaseSignature('prefill', ...) and PhaseSignature('decode', ...) on the graph."""
    opts = ctx.options.get(NAME, {})
    seq = int(opts.get("prefill_seq", ctx.seq))
    kv = int(opts.get("decode_kv", ctx.past or seq))
    if seq <= 0 or kv <= 0:
        raise InputError(f"phases: prefill length {seq} and decode KV length {kv} must be positive")
    out = copy_module(gm)
    stage_calls(out)  # the program must be staged
    device = device_of(out)
    names = [str(n.target) for n in out.graph.nodes if n.op == "placeholder"]

    prefill_args = example_inputs(out, ctx.batch, seq, 0, device)
    cache = new_kv_cache()
    prefill_args[names.index(PAST_KEY_VALUES)] = cache  # filled by the prefill run, reused by decode
    prefill = meta.PhaseSignature("prefill", ctx.batch, seq, 0, _record(out, prefill_args))

    if kv == seq:
        decode_args = example_inputs(out, ctx.batch, 1, 0, device)
        decode_args[names.index(PAST_LEN)] = kv
        decode_args[names.index(PAST_KEY_VALUES)] = cache
    else:
        decode_args = example_inputs(out, ctx.batch, 1, kv, device)
    decode = meta.PhaseSignature("decode", ctx.batch, 1, kv, _record(out, decode_args))
    out.meta[meta.PHASES] = (prefill, decode)
    return out
