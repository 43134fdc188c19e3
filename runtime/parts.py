"""Build what one rank runs: the traced model for attention ranks, sliced expert slots, shared experts.

Weights are the monolithic model's: transformers builds the whole model with the seed (or a
safetensors checkpoint fills it), then the rank keeps only what it owns. Expert slots are slices
of the layer's 3-D expert tensors (transformers 5 stores E experts as one module).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from planner.frontend.trace import CausalLMRoot, Traced, build_model, trace_model
from planner.frontend.roles import ModuleRoles, recognise
from planner.frontend.zoo import ModelSource, load_source
from runtime.errors import SpecError
from runtime.interpreter import GraphMap, StageInterpreter
from runtime.kv import KVStore
from runtime.spec import InstanceSpec, RunSpec

if TYPE_CHECKING:  # transformers is imported lazily, by build_model; types only here
    from transformers import PreTrainedModel


@dataclass
class RankParts:
    """The modules of one rank, by role."""

    source: ModelSource
    hidden: int
    vocab: int
    num_layers: int
    num_experts: int
    moe_layers: list[int]
    dtype: torch.dtype
    traced: Traced | None = None  # attention ranks
    gmap: GraphMap | None = None
    experts: dict[int, nn.Module] = field(default_factory=dict)  # layer -> this rank's slots
    shared: dict[int, nn.Module] = field(default_factory=dict)  # layer -> shared experts it serves
    params: int = 0  # parameters this rank holds

    def interpreter(self, *, rank: int, kv: KVStore, remote_shared: bool, clock: dict[str, float]) -> StageInterpreter:
        """A fresh interpreter of this attention rank's graph (one per microbatch)."""
        if self.traced is None or self.gmap is None:  # internal: only attention ranks run the graph
            raise AssertionError(f"rank {rank} has no traced model: build_parts traces it for attention ranks only")
        return StageInterpreter(self.traced, self.gmap, rank=rank, kv=kv, remote_shared=remote_shared, clock=clock)


class _RemoteExperts(nn.Module):
    """Stands in for the expert container on attention ranks: the interpreter never calls it."""

    def forward(self, *args, **kwargs):  # pragma: no cover - the interpreter pauses before this node
        raise RuntimeError("routed experts are remote on this rank; the interpreter must pause at this node")


def load_weights(model: nn.Module, path: str, name: str) -> None:
    """Fill `model` from a safetensors file holding its state_dict keys; a bad file fails naming the key."""
    from safetensors import safe_open

    try:
        handle = safe_open(path, framework="pt")
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise SpecError(f"{path}: cannot read safetensors weights ({type(exc).__name__}: {exc}); give a "
                        "checkpoint written by safetensors.torch.save_file(model.state_dict())") from None
    with handle as f:
        keys = set(f.keys())
        for key, tensor in model.state_dict(keep_vars=True).items():
            if key not in keys:
                raise SpecError(f"{path}: no tensor '{key}' for {name}; the checkpoint must hold every key of the "
                                "model's state_dict")
            shape = tuple(f.get_slice(key).get_shape())
            if shape != tuple(tensor.shape):
                raise SpecError(f"{path}: tensor '{key}' has shape {list(shape)}, {name} needs {list(tensor.shape)}")
            if tensor.device.type != "meta":
                with torch.no_grad():
                    tensor.copy_(f.get_tensor(key))


def check_weights(spec: RunSpec) -> None:
    """Validate a --weights file against the model on meta (no memory), before any process starts."""
    if spec.weights is None:
        return
    src = load_source(spec.model)
    load_weights(build_model(src, device="meta"), spec.weights, src.name)


def build_full(spec: RunSpec, device: torch.device | str = "cpu") -> tuple[ModelSource, PreTrainedModel]:
    """The monolithic model with the run's weights (seeded, or the checkpoint), built on `device`.

    On a GPU with bf16 weights the experts run transformers' grouped_mm kernel (batched_mm gathers a
    weight copy per token, far too slow at full size); everywhere else batched_mm, which the CPU
    reference uses too. Seeded weights depend on the device's generator: identical on every GPU (and
    on every CPU), but a GPU's differ from a CPU's, so an NCCL run's reference is built on a GPU
    (`runtime.reference.reference_device`).
    """
    src = load_source(spec.model)
    model = build_model(src, device=str(device), seed=spec.seed)
    if spec.weights:
        load_weights(model, spec.weights, src.name)
    if torch.device(device).type == "cuda" and next(model.parameters()).dtype == torch.bfloat16:
        model.config._experts_implementation = "grouped_mm"
    return src, model


def slice_experts(container: nn.Module, logical: list[int]) -> nn.Module:
    """The container restricted to experts `logical` (local expert i = logical[i]; repeats allowed)."""
    num = getattr(container, "num_experts", None)
    whole = logical == list(range(num or 0))  # the rank hosts every expert in order: share, don't copy
    idx = torch.tensor(logical, dtype=torch.int64)
    new = copy.copy(container)
    new._parameters, new._buffers, new._modules = {}, {}, dict(container._modules)
    for name, p in container.named_parameters(recurse=False):
        data = p.detach() if whole else p.detach()[idx.to(p.device)].clone()
        new._parameters[name] = nn.Parameter(data, requires_grad=False)
    for name, b in container.named_buffers(recurse=False):
        new._buffers[name] = b[idx.to(b.device)].clone() if b.ndim and b.shape[0] == num and not whole else b
    # setattr: nn.Module types unknown attributes as Tensor | Module; num_experts is the plain int forward reads
    setattr(new, "num_experts", len(logical))
    return new


def _release(container: nn.Module) -> None:
    """Drop a container's full expert tensors once sliced (keeps peak memory at one model + one layer)."""
    for name, _ in list(container.named_parameters(recurse=False)):
        setattr(container, name, None)


def remote_shared(inst: InstanceSpec, rank: int) -> bool:
    """True when this attention rank sends its tokens' shared-expert work to other ranks."""
    return bool(inst.shared_ranks) and rank not in inst.shared_ranks


def build_parts(spec: RunSpec, inst: InstanceSpec | None, rank: int, device: torch.device) -> RankParts:
    """Everything `rank` runs in `inst` (None: an idle rank, which builds nothing)."""
    src, model = build_full(spec, device)
    cfg = model.config
    root = CausalLMRoot(model)
    attention = inst is not None and rank in inst.attention_ranks
    traced = trace_model(model, src) if attention else None
    roles: ModuleRoles = traced.roles if traced else recognise(root)
    moe_layers = sorted(roles.experts)
    parts = RankParts(src, cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers, roles.num_experts, moe_layers,
                      next(model.parameters()).dtype)
    if inst is None:
        return parts
    slots = inst.slots_of(rank)
    for lp in inst.layers:
        container = root.get_submodule(roles.experts[lp.layer])
        if isinstance(container, nn.ModuleList):
            raise SpecError(f"{src.name}: layer {lp.layer} keeps experts as a list of modules; the runtime slices "
                            "transformers 5's 3-D expert tensors")
        if len(slots):
            parts.experts[lp.layer] = slice_experts(container, [lp.phy2log[s] for s in slots])
        _release(container)
        if rank in inst.shared_ranks:
            shared = [root.get_submodule(p) for p, (role, layer) in roles.leaves.items()
                      if role == "shared_experts" and layer == lp.layer]
            if len(shared) == 1:
                parts.shared[lp.layer] = shared[0]
    if traced is not None:  # an attention rank
        # the rank keeps its own modules only: routed (and remote shared) experts become stubs
        gm = traced.gm
        stubs = list(roles.experts.values())
        if remote_shared(inst, rank):
            stubs += [p for p, (role, _) in roles.leaves.items() if role == "shared_experts"]
        for path in stubs:
            parent, _, child = path.rpartition(".")
            setattr(gm.get_submodule(parent), child, _RemoteExperts())
        parts.traced = Traced(gm=gm, roles=roles, source=src, model=gm)
        parts.gmap = GraphMap.of(parts.traced)
        parts.params = sum(p.numel() for p in gm.parameters())
    parts.params += sum(p.numel() for m in parts.experts.values() for p in m.parameters())
    if not attention:
        parts.params += sum(p.numel() for m in parts.shared.values() for p in m.parameters())
    return parts
