"""Physical placement: which concrete devices each instance and role gets.

A constructive rule, not an ILP, and why: every instance size the search emits is a whole number
of servers (or a fraction of one server), and inside a CloudMatrix384 pod the UB fabric is flat
(< 3% bandwidth loss between servers, CMI §3), so the only choices that change modelled
traffic are (1) never splitting an instance across pods (RDMA is ~8x slower per chip), (2) keeping
each instance on whole servers (TP groups and a server's L1 switches stay inside one instance),
and (3) on GPU clusters, keeping an instance's all-to-all inside as few NVLink islands as possible.
Largest-first first-fit over server-aligned ranges, pod by pod, satisfies all three whenever any
placement does; there is nothing left for a solver to trade off. Inside an instance the expert
devices follow the attention devices (disaggregated) and shared-expert devices close the range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from costmodels.errors import InfeasibleError
from costmodels.topology import Topology


@dataclass(frozen=True)
class InstanceSlot:
    """An instance's concrete devices and their roles."""

    id: str
    devices: tuple[int, ...]
    attention_devices: tuple[int, ...]
    expert_devices: tuple[int, ...]
    shared_expert_devices: tuple[int, ...]


@dataclass(frozen=True)
class InstanceRequest:
    """What the search asks for: an instance of `attention` + `experts` devices.

    colocated: attention == experts == size, with `shared` of them computing the shared experts
    instead of holding routed slots (0 = shared experts replicated on every expert device).
    disaggregated: `attention` devices, then `experts` routed-expert devices, then `shared` devices.
    """

    id: str
    mode: str  # "colocated" | "disaggregated"
    attention: int
    experts: int
    shared: int = 0

    @property
    def size(self) -> int:
        if self.mode == "colocated":
            return self.attention
        return self.attention + self.experts + self.shared


def _ranges_per_pod(topo: Topology, devices: int | None = None) -> list[list[int]]:
    """Device ids per pod, only the first `devices` of the topology (None: all)."""
    n = topo.num_devices if devices is None else min(devices, topo.num_devices)
    per_pod = topo.num_devices // max(1, topo.pods)
    return [list(range(p * per_pod, min(n, (p + 1) * per_pod))) for p in range(topo.pods) if p * per_pod < n]


def place(topo: Topology, requests: list[InstanceRequest], devices: int | None = None) -> list[InstanceSlot]:
    """Assign device ids among the first `devices` devices (None: all): largest instance first,
    server-aligned, never across a pod boundary."""
    per_server = topo.devices_per_server
    free = _ranges_per_pod(topo, devices)  # free device ids per pod, ascending
    order = sorted(range(len(requests)), key=lambda i: (-requests[i].size, i))
    slots: dict[int, InstanceSlot] = {}
    for i in order:
        req = requests[i]
        span = math.ceil(req.size / per_server) * per_server if req.size >= per_server else req.size
        pod = next((p for p, ids in enumerate(free) if len(ids) >= span), None)
        if pod is None:
            raise InfeasibleError(
                f"placement: instance {req.id} needs {req.size} devices in one pod of {topo.name}, "
                f"{max(len(ids) for ids in free)} are free; use fewer or smaller instances"
            )
        taken = tuple(free[pod][: req.size])
        free[pod] = free[pod][span:]  # the rest of a partly used server stays idle: alignment first
        slots[i] = _roles(req, taken)
    return [slots[i] for i in range(len(requests))]


def _roles(req: InstanceRequest, devices: tuple[int, ...]) -> InstanceSlot:
    if req.mode == "colocated":
        routed = devices[: len(devices) - req.shared] if req.shared else devices
        shared = devices[len(devices) - req.shared :] if req.shared else devices
        return InstanceSlot(req.id, devices, devices, routed, shared)
    a = devices[: req.attention]
    e = devices[req.attention : req.attention + req.experts]
    s = devices[req.attention + req.experts :] if req.shared else e
    return InstanceSlot(req.id, devices, a, e, s)
