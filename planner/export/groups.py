"""Phase shapes of a plan as engines see them: one group (folder of engine files) per shape.

Instances of a phase that share a placement and device counts form a group; its EP ranks are the
dies of the expert devices in ascending device order, the order launch scripts enumerate them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planner.ir import plan as ir


@dataclass(frozen=True)
class Group:
    """Instances of one phase sharing a placement and a shape: one folder of engine files.

    The engine's EP ranks are the dies of the expert devices in ascending device order (how the
    launch scripts enumerate nodes and visible devices); `phy2log` [L, R] is the placement in that
    rank order, R = ranks x slots_per_rank physical experts.
    """

    name: str
    phase: str
    instances: tuple[ir.Instance, ...]
    placement: ir.ExpertPlacement
    devices: tuple[int, ...]  # the EP devices in engine rank order
    ranks: int
    slots_per_rank: int
    phy2log: np.ndarray

    @property
    def num_physical(self) -> int:
        return self.ranks * self.slots_per_rank


def groups_of(plan: ir.Plan, notes: list[str]) -> list[Group]:
    """Phase shapes: instances of a phase with the same placement and device counts, in plan order."""
    out = []
    for phase_name, phase in plan.phases.items():
        keyed: dict[tuple, list[ir.Instance]] = {}
        for inst in phase.instances:
            key = (inst.experts, inst.mode, len(inst.devices), len(inst.attention_devices), len(inst.expert_devices))
            keyed.setdefault(key, []).append(inst)
        for k, (key, members) in enumerate(keyed.items()):
            name = phase_name if len(keyed) == 1 else f"{phase_name}-{k}"
            out.append(_group(plan, name, phase_name, tuple(members), phase.experts[key[0]], notes))
    return out


def _group(plan: ir.Plan, name: str, phase: str, members: tuple[ir.Instance, ...], placement: ir.ExpertPlacement,
           notes: list[str]) -> Group:
    dies = plan.topology.dies_per_device
    S = placement.slots_per_device
    first = members[0]
    if placement.weighted:
        notes.append(f"{name}: engines split an expert's tokens evenly over its replicas, not by the plan's "
                     "weighted shares; exported the same slots with an equal split")
    if first.mode == "disaggregated":
        notes.append(f"{name}: engines cannot express disaggregated MoE-attention ({len(first.attention_devices)} "
                     f"attention + {len(first.expert_devices)} expert devices); exported the expert devices' "
                     "placement as one colocated EP group on those devices, a different deployment for which "
                     "the plan's predicted throughput and latency do not hold")
    if set(first.shared_expert_devices) - set(first.expert_devices):
        notes.append(f"{name}: engines replicate the shared experts on every EP rank, not on dedicated devices; "
                     "the dedicated shared-expert devices are left out of the EP group")
    if S % dies:
        notes.append(f"{name}: {S} slots per device do not split over its {dies} dies; exported one EP rank "
                     "per device")
        dies = 1
    # Engine rank order: ascending device id (node by node, then local index); the plan orders
    # slots by expert_devices, so permute the slot blocks of each device.
    order = sorted(range(len(first.expert_devices)), key=lambda k: first.expert_devices[k])
    table = np.array([lp.phy2log for lp in placement.layers], dtype=np.int64).reshape(len(placement.layers), -1, S)
    phy2log = table[:, order, :].reshape(len(placement.layers), -1)
    devices = tuple(first.expert_devices[k] for k in order)
    return Group(name=name, phase=phase, instances=members, placement=placement, devices=devices,
                 ranks=len(devices) * dies, slots_per_rank=S // dies, phy2log=phy2log)


def eplb_tensors(plan: ir.Plan, group: Group) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """phy2log [L, R], log2phy [L, E, X] (-1 padded, X = most replicas of any expert), logcnt [L, E]."""
    E = plan.model.num_routed_experts
    phy2log = group.phy2log
    logcnt = np.stack([np.bincount(row, minlength=E) for row in phy2log]).astype(np.int64)
    return phy2log, log2phy(phy2log, E, int(logcnt.max())), logcnt


def log2phy(phy2log: np.ndarray, experts: int, width: int) -> np.ndarray:
    """[L, experts, width]: the slots of each expert in ascending order, -1 padded."""
    out = np.full((phy2log.shape[0], experts, width), -1, dtype=np.int64)
    for layer, row in enumerate(phy2log):
        filled = np.zeros(experts, dtype=np.int64)
        for slot, e in enumerate(row):
            out[layer, e, filled[e]] = slot
            filled[e] += 1
    return out
