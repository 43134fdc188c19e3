"""Build what one rank runs: stage modules of the model's staged program, sharded to the rank's part.

Weights are the monolithic model's: transformers builds the whole model with the seed (or a
safetensors checkpoint fills it), and the staged program the launcher compiled once on the meta
device (`program.json`, `planner.frontend.program_io`) is bound to that model: its stage modules hold
the model's own weights and no worker traces anything. The rank keeps only the stages it runs:
an attention rank keeps the program with its routed-experts stages (and remote shared-experts
stages) stubbed out; an expert rank keeps each layer's routed-experts stage sharded to the experts
of its slots; a shared-expert rank keeps the shared-experts stages it serves.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.fx as fx
import torch.nn as nn

from planner.frontend.program_io import program_from_json
from planner.frontend.shape import shape_of_model
from planner.frontend.stages import KVCache, StagedProgram, expert_shard, routed_operands, stage_calls
from planner.frontend.trace import build_model
from planner.frontend.zoo import ModelSource, load_source
from runtime.errors import SpecError
from runtime.interpreter import RankInterpreter, RankProgram, call_stage
from runtime.kv import StaticKVCache
from runtime.spec import InstanceSpec, RunSpec

if TYPE_CHECKING:  # transformers is imported lazily, by build_model; types only here
    from transformers import PreTrainedModel


@dataclass
class ExpertStage:
    """A routed-experts stage module sharded to one rank's slots; called on the rows sent to them."""

    name: str
    module: fx.GraphModule
    operands: tuple[int, int, int]  # positions of (hidden, ids, weights) among the stage's inputs
    logical: torch.Tensor  # [S] the global expert id of each local slot, on the rank's device

    def __call__(self, rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Expert outputs [R, H] of rows [R, H] sent to local slots [R], unweighted (the sender weights).

        A slot outside 0..S-1 (an empty row of a fixed-capacity block, or a row for the shared
        experts) runs at weight 0 and gives a zero row: no row is picked out with a read-back."""
        args: list[torch.Tensor] = [rows, rows, rows]
        h, i, w = self.operands
        S = self.logical.shape[0]
        args[h] = rows
        args[i] = self.logical[slots.clamp(0, S - 1)][:, None]
        args[w] = ((slots >= 0) & (slots < S)).to(rows.dtype)[:, None]
        return call_stage(self.module, *args)[0]


    def weighted(self, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The stage as the program calls it: tokens [T, H] with their top-k ids and weights -> the weighted
        sum [T, H] (a rank that hosts every expert runs its tokens this way, with no dispatch)."""
        args: list[torch.Tensor] = [hidden, hidden, hidden]
        h, i, w = self.operands
        args[h], args[i], args[w] = hidden, ids, weights
        return call_stage(self.module, *args)[0]


@dataclass
class SharedStage:
    """A shared-experts stage module a rank computes for other ranks' tokens: rows [R, H] -> [R, H]."""

    name: str
    module: fx.GraphModule

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        return call_stage(self.module, rows)[0]


@dataclass
class RankParts:
    """The stage modules of one rank, by role."""

    source: ModelSource
    hidden: int
    vocab: int
    num_layers: int
    num_experts: int
    moe_layers: list[int]
    dtype: torch.dtype
    top_k: int  # routed experts per token: with the microbatch size it sets the exchange's capacity
    program: RankProgram | None = None  # attention ranks: the staged program, less the stages run elsewhere
    experts: dict[int, ExpertStage] = field(default_factory=dict)  # layer -> this rank's shard
    shared: dict[int, SharedStage] = field(default_factory=dict)  # layer -> shared experts it serves
    params: int = 0  # parameters this rank holds

    def interpreter(self, *, rank: int, kv: KVCache | StaticKVCache, remote_shared: bool, clock: dict[str, float],
                    stage_clock: dict[str, float] | None = None) -> RankInterpreter:
        """A fresh interpreter of this attention rank's program (one per microbatch)."""
        if self.program is None:  # internal: only attention ranks run the program
            raise AssertionError(f"rank {rank} has no staged program: build_parts keeps it for attention ranks only")
        return RankInterpreter(self.program, rank=rank, kv=kv, remote_shared=remote_shared, clock=clock,
                               stage_clock=stage_clock)


class RemoteStage(nn.Module):
    """Stands in for a stage another rank runs: the interpreter never calls it."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, *args, **kwargs):  # pragma: no cover - the interpreter pauses before this stage
        raise RuntimeError(f"stage {self.name} runs on other ranks; the interpreter must not call it here")


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


def build_full(spec: RunSpec, device: torch.device | str = "cpu", *, fast: bool = False
               ) -> tuple[ModelSource, PreTrainedModel]:
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
        # the reference and generate's baseline: transformers' grouped_mm experts, eager attention
        # (measured faster than SDPA in generate at batch 32: 343 against 200 tok/s on one H200)
        model.config._experts_implementation = "grouped_mm"
        if fast:  # a rank's model: podplan's fast paths on top (runtime.fast_paths)
            from runtime.fast_paths import speed_up

            speed_up(model)
    return src, model


# On a GPU, routed-expert weights are stored [E, in, out] (row-major B for torch._grouped_mm) unless
# this is "native" (transformers' own [E, out, in], read through a transposed view): a bench knob.
EXPERT_LAYOUT_ENV = "PODPLAN_EXPERT_LAYOUT"


def grouped_layout(modules: list[nn.Module]) -> int:
    """Re-store the 3-D expert weights of transformers' experts modules as [E, in, out], contiguous, and
    mark them `is_transposed` (transformers' grouped_mm path then multiplies by them without a
    transposed view). Same values, one layer at a time (the peak is one layer's copy). Returns how many."""
    done = 0
    for module in modules:
        for m in module.modules():
            if getattr(m, "is_transposed", True) or not hasattr(m, "down_proj"):
                continue
            names = [n for n in ("gate_up_proj", "up_proj", "down_proj") if isinstance(getattr(m, n, None), nn.Parameter)]
            if not names or any(getattr(m, n).dim() != 3 for n in names):
                continue
            with torch.no_grad():
                for n in names:
                    setattr(m, n, nn.Parameter(getattr(m, n).transpose(1, 2).contiguous(), requires_grad=False))
            setattr(m, "is_transposed", True)  # transformers' flag, read by its grouped_mm path
            done += 1
    return done


def remote_shared(inst: InstanceSpec, rank: int) -> bool:
    """True when this attention rank sends its tokens' shared-expert work to other ranks."""
    return bool(inst.shared_ranks) and rank not in inst.shared_ranks


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_parts(spec: RunSpec, inst: InstanceSpec | None, rank: int, device: torch.device,
                program_doc: dict) -> RankParts:
    """Everything `rank` runs in `inst` (None: an idle rank, which keeps nothing).

    `program_doc` is the run's staged program (`planner.frontend.program_io.program_document`),
    bound here to the rank's own model."""
    src, model = build_full(spec, device, fast=True)
    cfg = model.config
    dtype = next(model.parameters()).dtype
    program = program_from_json(program_doc, model, src)
    top_k = shape_of_model(model, src).top_k
    del model  # the stage modules hold the weights from here on
    calls = [key for _, key in stage_calls(program)]
    routed = {key.layer: key.name for key in calls if key.kind == "routed_experts"}
    shared = {key.layer: key.name for key in calls if key.kind == "shared_experts"}
    num_experts = max((layout.num_experts for layout in program.experts.values()), default=0)
    parts = RankParts(src, cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers, num_experts,
                      sorted(k for k in routed if k is not None), dtype, top_k)
    if inst is not None:
        _keep(parts, program, inst, rank, routed, shared, device)
        if (device.type == "cuda" and dtype == torch.bfloat16 and os.environ.get(EXPERT_LAYOUT_ENV) != "native"
                and cfg._experts_implementation == "grouped_mm"):  # the Triton kernels read either layout
            grouped_layout([e.module for e in parts.experts.values()])
    del program
    gc.collect()  # stage graphs are reference cycles: free what the rank dropped now, not at some later GC
    return parts


def _keep(parts: RankParts, program: StagedProgram, inst: InstanceSpec, rank: int, routed: dict, shared: dict,
          device: torch.device) -> None:
    """Fill `parts` with what `rank` runs; stub out the rest of the program."""
    slots = inst.slots_of(rank)
    attention = rank in inst.attention_ranks
    for lp in inst.layers:
        name = routed.get(lp.layer)
        if name is None:
            raise SpecError(f"{parts.source.name}: the staged program has no routed-experts stage for layer "
                            f"{lp.layer}, which the spec places experts for")
        if len(slots):
            logical = [lp.phy2log[s] for s in slots]
            module = expert_shard(program, name, logical, release=True)
            parts.experts[lp.layer] = ExpertStage(name, module, routed_operands(program, name),
                                                  torch.tensor(logical, dtype=torch.int64, device=device))
        if rank in inst.shared_ranks and lp.layer in shared:
            stage = program.gm.get_submodule(shared[lp.layer])
            assert isinstance(stage, fx.GraphModule), f"stage {shared[lp.layer]}: the staged lint checks this"
            parts.shared[lp.layer] = SharedStage(shared[lp.layer], stage)
    if attention:
        parts.program = RankProgram.of(program)  # reads the routed stages' operands: before the stubs
        stubs = list(routed.values())
        if remote_shared(inst, rank):
            stubs += list(shared.values())
        for name in stubs:
            program.gm.add_module(name, RemoteStage(name))
        parts.params = _params(program.gm)
    parts.params += sum(_params(e.module) for e in parts.experts.values())
    if not attention:
        parts.params += sum(_params(s.module) for s in parts.shared.values())
