"""Memory per die by role: weights (replicated parts and expert slots), KV cache, buffers, workspace.

Also the expert layout rule (how many slots per die, where the shared expert lives) that
both memory and the serving model use, and a feasibility check naming the role that overflows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from costmodels.errors import InputError
from costmodels.hardware import DeviceSpec, dtype_bytes
from costmodels.model_shape import ModelShape

COMM_BUFFER_GB = 0.645  # CMI [S]: static communication buffers ~645 MB per die (reused for GPUs)
# Workspace: ~8 live hidden-sized BF16 tensors per in-flight token (residual, norm, attention
# in/out, dispatch send/receive, combine) plus the experts' gate/up outputs. An assumption.
ACT_HIDDEN_COPIES = 8
GB = 1e9


@dataclass(frozen=True)
class ExpertLayout:
    """Expert slots of one EP group of `ep` dies.

    routed experts + `redundant` replicas spread over the routed dies; the shared expert either
    has `shared_dies` dedicated dies (EP > routed, CMI/XDS decode: 32 of 320) or is replicated
    on every die (`shared_dies` = 0, CMI prefill).
    """

    ep: int
    routed: int
    redundant: int
    shared_dies: int
    has_shared: bool

    @property
    def routed_dies(self) -> int:
        return self.ep - self.shared_dies

    @property
    def slots_per_routed_die(self) -> float:
        """Mean routed slots per routed die (balanced placement)."""
        return (self.routed + self.redundant) / self.routed_dies if self.routed_dies else 0.0

    @property
    def max_slots_per_routed_die(self) -> int:
        return math.ceil(self.slots_per_routed_die - 1e-9)

    @property
    def shared_replicated(self) -> bool:
        return self.has_shared and self.shared_dies == 0


def expert_layout(shape: ModelShape, ep: int, redundant: int | None = None) -> ExpertLayout:
    """Slots for `ep` EP dies; redundant=None picks the published default.

    EP > routed (decode): one slot per die; the shared expert gets ceil(E / top-k) dies, so a
    shared die receives as many tokens as a routed die (every token once vs top-k / E of them);
    the rest are redundant replicas (EP320 -> 32 shared + 32 redundant, CMI; EP288 -> 32 + 0, XDS).
    EP <= routed (prefill): E/EP routed + 1 redundant per die, shared replicated (EP32, CMI/DSV3).
    """
    E = shape.num_routed_experts
    has_shared = shape.params_shared > 0
    if E == 0:
        return ExpertLayout(ep=ep, routed=0, redundant=0, shared_dies=0, has_shared=has_shared)
    if ep < 1:
        raise InputError(f"--ep {ep}: the expert-parallel size must be >= 1")
    if redundant is not None and redundant < 0:
        raise InputError(f"redundant experts must be >= 0, got {redundant}")
    if ep > E:
        if redundant is None:
            shared = min(math.ceil(E / max(1, shape.top_k)), ep - E) if has_shared else 0
            redundant = ep - E - shared
        if E + redundant > ep:
            raise InputError(f"--ep {ep}: {E} routed + {redundant} redundant experts need more than {ep} dies")
        shared = ep - E - redundant if has_shared else 0
        if not has_shared:
            redundant = ep - E  # every die holds a slot
        return ExpertLayout(ep=ep, routed=E, redundant=redundant, shared_dies=shared, has_shared=has_shared)
    if redundant is None:
        per_die = math.ceil(E / ep)
        redundant = 0 if ep == 1 else per_die * ep - E if E % ep else ep
    return ExpertLayout(ep=ep, routed=E, redundant=redundant, shared_dies=0, has_shared=has_shared)


def dests_per_token(shape: ModelShape, layout: ExpertLayout) -> int:
    """Dispatch destinations per token: top-k, plus one when the shared expert has its own dies."""
    return shape.top_k + (1 if layout.shared_dies > 0 else 0)


@dataclass(frozen=True)
class DieMemory:
    """HBM use of one die in one role, GB (the plan records per-device use as planner.ir.plan.MemoryUse)."""

    role: str
    weights: float
    kv: float
    buffers: float
    activations: float
    capacity: float

    @property
    def total(self) -> float:
        return self.weights + self.kv + self.buffers + self.activations

    @property
    def overflow(self) -> float:
        return self.total - self.capacity

    def to_dict(self) -> dict:
        return {"weights": self.weights, "kv": self.kv, "buffers": self.buffers,
                "activations": self.activations, "total": self.total, "capacity": self.capacity}


def replicated_weight_bytes(shape: ModelShape, weight_bytes: float, *, tp: int = 1, extra_layers: int = 0,
                            with_gates: bool = True) -> float:
    """Everything but the experts, held by every attention die (1/tp of attention and dense FFNs).

    `extra_layers`: MTP modules (one more attention layer each, DSV3 §2.2).
    """
    attention = shape.params_attention * (shape.num_layers + extra_layers) / tp
    dense = shape.params_dense_ffn * shape.num_dense_layers / tp
    gates = shape.params_gate * (shape.num_moe_layers + extra_layers) if with_gates else 0
    return (attention + dense + shape.params_embed + shape.params_head) * weight_bytes + gates * dtype_bytes("bf16")


def expert_weight_bytes(shape: ModelShape, layout: ExpertLayout, weight_bytes: float, *, shared_die: bool,
                        extra_layers: int = 0, shared_weight_bytes: float | None = None) -> float:
    """Expert weights on one die: its routed slots (or the shared expert), plus a replicated shared expert.

    `weight_bytes` prices routed experts; `shared_weight_bytes` (default the same) the shared expert,
    which FP4 checkpoints keep in BF16 like the other non-routed layers.
    """
    layers = shape.num_moe_layers + extra_layers
    shared_b = weight_bytes if shared_weight_bytes is None else shared_weight_bytes
    if shared_die:
        return shape.params_shared * layers * shared_b
    nbytes = layout.max_slots_per_routed_die * shape.params_expert * weight_bytes
    if layout.shared_replicated:
        nbytes += shape.params_shared * shared_b
    return nbytes * layers


def kv_bytes(shape: ModelShape, tokens: float, kv_bytes_per_value: float, *, extra_layers: int = 0,
             seq_len: float | None = None) -> float:
    """KV cache of `tokens` cached token positions on one die, all layers. With the sequences' length
    `seq_len`, sliding-window layers keep only their window of each sequence."""
    keep = shape.attended_kv(seq_len) / seq_len if seq_len else 1.0
    return tokens * (shape.num_layers * keep + extra_layers) * shape.kv_values_per_token_per_layer() * kv_bytes_per_value


def workspace_bytes(shape: ModelShape, tokens: float, pairs: float, logits: float) -> float:
    """Activation workspace for `tokens` in flight, `pairs` token-expert pairs, `logits` rows."""
    hidden = tokens * shape.hidden * 2.0 * ACT_HIDDEN_COPIES
    experts = pairs * shape.moe_intermediate * 2.0 * 2  # gate and up outputs, BF16
    return hidden + experts + logits * shape.vocab * 4.0


def use(role: str, hw: DeviceSpec, *, weights: float, kv: float, workspace: float) -> DieMemory:
    """A role's use in GB (bytes in), with the communication buffers of CMI."""
    return DieMemory(role=role, weights=weights / GB, kv=kv / GB, buffers=COMM_BUFFER_GB,
                     activations=workspace / GB, capacity=hw.hbm_gb)


def check(uses: list[DieMemory], fix: str) -> tuple[bool, str]:
    """(feasible, reason): the first role over its HBM, with what it needs and by how much."""
    for u in sorted(uses, key=lambda u: -u.overflow):
        if u.overflow > 0:
            return False, (
                f"{u.role} needs {u.total:.2f} GB but a die has {u.capacity:.1f} GB of HBM (over by {u.overflow:.2f} GB: "
                f"weights {u.weights:.2f}, KV {u.kv:.2f}, buffers {u.buffers:.2f}, workspace {u.activations:.2f}); {fix}"
            )
    return True, ""
