"""Typed node metadata: every `node.meta` key podplan uses is declared here, once.

Passes read and write metadata only through these accessors, so a missing key fails with
a message that names the node and the pass to run first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.fx as fx

from passes.errors import MetadataError

ROLE = "podplan.role"  # str, one of planner.frontend.roles.ROLES
LAYER = "podplan.layer"  # int | None (None outside decoder layers)
MODULE = "podplan.module"  # str: qualified name of the innermost module the node belongs to
COST = "podplan.cost"  # NodeCost
STAGE = "podplan.stage"  # str: stage kind assigned by classification


@dataclass(frozen=True)
class NodeCost:
    """What one node costs, for the traced (batch, seq) signature.

    params, weight_bytes: parameters the node owns (a leaf module's, else 0).
    flops_per_token: floating-point operations per token (multiply-add = 2).
    act_bytes_per_token: activation bytes read + written per token.
    out_shapes: output tensor shapes from shape propagation.
    out_dtype: dtype of the (first) output tensor.
    """

    params: int
    weight_bytes: int
    flops_per_token: float
    act_bytes_per_token: float
    out_shapes: tuple[tuple[int, ...], ...]
    out_dtype: str


def _get(node: fx.Node, key: str, provider: str) -> Any:
    try:
        return node.meta[key]
    except KeyError:
        raise MetadataError(f"node '{node.name}' has no '{key}'; run {provider} first") from None


def role_of(node: fx.Node) -> str:
    return _get(node, ROLE, "the frontend trace")


def layer_of(node: fx.Node) -> int | None:
    return _get(node, LAYER, "the frontend trace")


def module_of(node: fx.Node) -> str:
    return _get(node, MODULE, "the frontend trace")


def cost_of(node: fx.Node) -> NodeCost:
    return _get(node, COST, "the 'annotate' pass")


def stage_of(node: fx.Node) -> str:
    return _get(node, STAGE, "the 'classify' pass")


def has(node: fx.Node, key: str) -> bool:
    return key in node.meta


# --- stages (passes/classify.py, passes/split.py and the analyses after them) ----------------------

STAGE_LAYER = "podplan.stage_layer"  # int | None: decoder layer of the stage the node runs in (None: embed, head)
STAGED = "podplan.staged"  # graph-level bool: the top-level graph only wires stage submodules (split)
KV_INPUTS = "podplan.kv_inputs"  # graph-level bool: positions and the KV cache are graph inputs (kv-cache)
CUTS = "podplan.cuts"  # graph-level tuple[CutTensor]: every value crossing a stage boundary (cut-analysis)
EXPERTS = "podplan.experts"  # graph-level dict[str, ExpertWeights]: routed_experts stage name -> its stacked weights (expert-decompose)
PHASES = "podplan.phases"  # graph-level tuple[PhaseSignature]: prefill and decode stage signatures (phases)
SCHEDULE = "podplan.schedule"  # graph-level MicrobatchSchedule of passes/microbatch.py (microbatch)

# Keys stored in `GraphModule.meta` rather than on nodes.
GRAPH_KEYS = (STAGED, KV_INPUTS, CUTS, EXPERTS, PHASES, SCHEDULE)

# Stage kinds, in the order they run inside one decoder layer (embed before all layers, head after).
STAGE_KINDS = ("embed", "attention", "moe_gate", "dense_ffn", "routed_experts", "shared_experts", "head")


@dataclass(frozen=True, order=True)
class StageKey:
    """One stage of the staged program: a (decoder layer, kind) pair; layer is None for embed and head."""

    layer: int | None
    kind: str

    @property
    def name(self) -> str:
        """Submodule name: 'embed', 'head', 'layer3_attention'."""
        return self.kind if self.layer is None else f"layer{self.layer}_{self.kind}"


@dataclass(frozen=True)
class CutTensor:
    """One value crossing from stage `src` to stage `dst`, for the annotated (batch, seq) signature.

    kind: hidden (into a gate or FFN-side stage), routing_ids, routing_weights, expert_out,
          shared_out, ffn_out, residual (the hidden stream between embed/attention/head stages),
          input (program input), context (positions, mask, rotary tables: recomputable from
          positions), scalar (Python ints: shapes, past_len), state (the KV cache object).
    shapes: shape of every tensor in the value (a tuple value such as (cos, sin) has several).
    fanout: copies sent per token (top-k for hidden states to / outputs from routed experts, else 1).
    bytes_bf16, bytes_int8: bytes per token on the wire, fan-out included (0 for scalars, state).
    """

    src: str  # a stage name, or "input" for program inputs
    dst: str
    value: str  # name of the node that produced the value in the unsplit graph
    kind: str
    shapes: tuple[tuple[int, ...], ...]
    dtype: str
    fanout: int
    bytes_bf16: float
    bytes_int8: float


@dataclass(frozen=True)
class ExpertWeights:
    """A routed_experts stage's stacked expert weights, which split by expert id along dim 0.

    (Not costmodels.memory.ExpertLayout, which is how an EP group's dies hold expert slots.)
    """

    stage: str
    num_experts: int
    weights: tuple[tuple[str, tuple[int, ...]], ...]  # (parameter name, full shape [E, ...])
    params_per_expert: int
    bytes_per_expert: int


@dataclass(frozen=True)
class TensorSig:
    """A value at a stage boundary: tensor shape and dtype, or a Python value's type name."""

    name: str
    shape: tuple[int, ...] | None
    dtype: str


@dataclass(frozen=True)
class StageSignature:
    stage: str
    inputs: tuple[TensorSig, ...]
    outputs: tuple[TensorSig, ...]


@dataclass(frozen=True)
class PhaseSignature:
    """The staged program's boundary shapes for one phase: `seq` new tokens per sequence after `past` cached."""

    phase: str
    batch: int
    seq: int
    past: int
    stages: tuple[StageSignature, ...]


def stage_layer_of(node: fx.Node) -> int | None:
    return _get(node, STAGE_LAYER, "the 'classify' pass")


def stage_key_of(node: fx.Node) -> StageKey:
    return StageKey(stage_layer_of(node), stage_of(node))


def graph_meta(gm: fx.GraphModule, key: str) -> Any:
    """A graph-level key, failing with the pass that provides it."""
    providers = {STAGED: "split", KV_INPUTS: "kv-cache", CUTS: "cut-analysis", EXPERTS: "expert-decompose",
                 PHASES: "phases", SCHEDULE: "microbatch"}
    try:
        return gm.meta[key]
    except KeyError:
        raise MetadataError(f"graph has no '{key}'; run the '{providers.get(key, '?')}' pass first") from None
