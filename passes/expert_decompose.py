"""expert-decompose: make each routed_experts stage addressable per expert id.

transformers 5 keeps a layer's E experts as one module with 3-D weights (`gate_up_proj [E, 2I, H]`,
`down_proj [E, H, I]`). The pass wraps that module in an `ExpertShard` hosting all E experts;
`shard_stage(stage, ids)` gives the stage a device runs when it hosts only `ids`: the weights
sliced along dim 0, run on the (token, slot) pairs routed to those ids. The stage's output is a
sum over experts, so the outputs of the shards of any partition of 0..E-1 add up to the layer's.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from costmodels.errors import InputError
from passes import meta
from passes.context import PassContext
from passes.graphs import copy_module, stage_calls, stage_module

NAME = "expert-decompose"
NEEDS = (meta.STAGED,)
PROVIDES = (meta.EXPERTS,)


def _expert_tensors(experts: nn.Module) -> tuple[int, list[tuple[str, torch.Tensor]]]:
    """E and the module's own parameters/buffers that hold one slice per expert along dim 0."""
    params = list(experts.named_parameters(recurse=False))
    if not params or any(p.ndim < 2 for _, p in params):
        raise InputError(f"expert-decompose: {type(experts).__name__} does not store experts as stacked weights [E, ...]")
    num = params[0][1].shape[0]
    tensors = [(n, t) for n, t in [*params, *experts.named_buffers(recurse=False)] if t.ndim >= 1 and t.shape[0] == num]
    return num, tensors


def _sliced(experts: nn.Module, ids: torch.Tensor) -> nn.Module:
    """A shallow copy of the transformers expert module holding only experts `ids` (renumbered 0..)."""
    num, tensors = _expert_tensors(experts)
    part = copy.copy(experts)
    part._parameters = dict(experts._parameters)
    part._buffers = dict(experts._buffers)
    for name, tensor in tensors:
        piece = tensor.detach().index_select(0, ids.to(tensor.device))
        if name in part._parameters:
            part._parameters[name] = nn.Parameter(piece, requires_grad=False)
        else:
            part._buffers[name] = piece
    if hasattr(part, "num_experts"):
        # a plain int attribute of transformers' module; setattr because nn.Module's stub only
        # types tensor and module attributes
        setattr(part, "num_experts", len(ids))
    return part


class ExpertShard(nn.Module):
    """Routed experts of one layer restricted to the expert ids in `hosted`.

    forward(hidden [T, H], top_k_index [T, K] global ids, top_k_weights [T, K]) -> [T, H]: the
    weighted sum, per token, of the outputs of its hosted selected experts (zero rows elsewhere).
    Computation goes through transformers' own expert module, so family specifics (activation,
    gating, biases) are unchanged.
    """

    local_id: torch.Tensor  # [E] local index of each global expert id, -1 if not hosted (a buffer)

    def __init__(self, experts: nn.Module, hosted: Sequence[int] | None = None):
        super().__init__()
        num, _ = _expert_tensors(experts)
        ids = sorted(set(range(num) if hosted is None else hosted))
        if not ids or ids[0] < 0 or ids[-1] >= num:
            raise InputError(f"expert ids {ids} out of range 0..{num - 1}; host a non-empty subset of the layer's experts")
        self.num_experts = num
        self.hosted = tuple(ids)
        self.source = [experts]  # a list: the unsliced module is not a child (no double-counted params)
        index = torch.tensor(ids, dtype=torch.long)
        self.experts = experts if len(ids) == num else _sliced(experts, index)
        local = torch.full((num,), -1, dtype=torch.long)
        local[index] = torch.arange(len(ids))
        device = next(experts.parameters()).device
        self.register_buffer("local_id", local.to(device), persistent=False)

    def select(self, hosted: Sequence[int]) -> ExpertShard:
        """The shard hosting `hosted` (global ids) of the same layer."""
        return ExpertShard(self.source[0], hosted)

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if hidden.device.type == "meta":
            return hidden.new_empty(hidden.shape)  # shapes only
        local = self.local_id[top_k_index]
        hosted = local >= 0
        # Pairs routed elsewhere run local expert 0 at weight 0 and add nothing. No `nonzero` to pick
        # the hosted pairs: on a GPU it waits for the device, and a runtime expert rank, which is sent
        # only pairs it hosts, calls this once per layer and microbatch.
        weights = torch.where(hosted, top_k_weights, torch.zeros_like(top_k_weights))
        return self.experts(hidden, local.clamp(min=0), weights).to(hidden.dtype)


def _experts_node(stage: fx.GraphModule, name: str) -> fx.Node:
    nodes = [n for n in stage.graph.nodes if n.op == "call_module" and meta.role_of(n) == "routed_experts"]
    if len(nodes) != 1:
        raise InputError(f"expert-decompose: stage {name} holds {len(nodes)} expert modules; expected exactly one")
    return nodes[0]


def shard_stage(stage: fx.GraphModule, hosted: Sequence[int]) -> fx.GraphModule:
    """A copy of a decomposed routed_experts stage that hosts only the experts `hosted`."""
    node = _experts_node(stage, "?")
    shard = stage.get_submodule(str(node.target))
    if not isinstance(shard, ExpertShard):
        raise InputError("shard_stage: the stage has no ExpertShard; run the 'expert-decompose' pass first")
    out = copy_module(stage)
    out.add_module(str(node.target), shard.select(hosted))
    return out


def _weights(name: str, experts: nn.Module) -> meta.ExpertWeights:
    num, tensors = _expert_tensors(experts)
    params = sum(t.numel() for n, t in tensors if n in experts._parameters)
    size = sum(t.numel() * t.element_size() for n, t in tensors if n in experts._parameters)
    return meta.ExpertWeights(
        stage=name,
        num_experts=num,
        weights=tuple((n, tuple(int(d) for d in t.shape)) for n, t in tensors),
        params_per_expert=params // num,
        bytes_per_expert=size // num,
    )


def expert_decompose(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Wrap every routed_experts stage's expert module in an ExpertShard hosting all experts."""
    out = copy_module(gm)
    weights: dict[str, meta.ExpertWeights] = {}
    for call, key in stage_calls(out):
        if key.kind != "routed_experts":
            continue
        stage = copy_module(stage_module(out, call))
        node = _experts_node(stage, key.name)
        experts = stage.get_submodule(str(node.target))
        if isinstance(experts, ExpertShard):
            experts = experts.source[0]
        stage.add_module(str(node.target), ExpertShard(experts))
        out.add_module(str(call.target), stage)
        weights[key.name] = _weights(key.name, experts)
    out.meta[meta.EXPERTS] = weights
    return out
