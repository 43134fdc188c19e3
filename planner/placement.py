"""Physical placement: which concrete devices each instance and role gets, and how many instances of a
size a slice of the topology holds by the same rule (the search counts with it).

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

from costmodels.errors import InfeasibleError, InputError
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


# --- what a slice of the topology holds, by the same rule (the search counts instances with it) -----
#
# A slice is the first N devices of a topology, counted per pod. The counts follow `place`: largest
# instance first, first fit pod by pod, whole servers from one server up; so an instance count the
# search picks is one `place` can lay out.


@dataclass(frozen=True)
class Slice:
    """The devices the search may use: the first `devices` of the topology, as device counts per pod."""

    topology: str
    pods: tuple[int, ...]  # usable devices in each pod, in device-id order
    per_server: int

    @property
    def devices(self) -> int:
        return sum(self.pods)

    @property
    def largest_pod(self) -> int:
        return max(self.pods)

    def span(self, size: int) -> int:
        """Devices an instance of `size` occupies: whole servers from one server up (placement aligns them)."""
        return math.ceil(size / self.per_server) * self.per_server if size >= self.per_server else size

    def fits(self, size: int) -> bool:
        return self.span(size) <= self.largest_pod


def topology_slice(topo: Topology, devices: int | None = None) -> Slice:
    """The first `devices` devices of `topo` (None: all); a count over the topology's is an InputError."""
    if devices is not None:
        if devices <= 0:
            raise InputError(f"--devices {devices}: must be > 0")
        if devices > topo.num_devices:
            raise InputError(f"--devices {devices}: {topo.name} has {topo.num_devices} devices; "
                             f"use --devices {topo.num_devices} or fewer, or a larger topology")
    n = topo.num_devices if devices is None else devices
    per_pod = topo.num_devices // max(1, topo.pods)
    pods = tuple(min(per_pod, n - p * per_pod) for p in range(math.ceil(n / per_pod)))
    return Slice(topo.name, pods, topo.devices_per_server)


def pack(pods: tuple[int, ...], span: int, count: int) -> list[int] | None:
    """Free devices per pod after first-fit of `count` instances of `span` devices, pod by pod (what
    planner.placement does); None when they do not all fit."""
    free = list(pods)
    for p in range(len(free)):
        k = min(count, free[p] // span)
        free[p] -= k * span
        count -= k
    return free if count == 0 else None


def _capacity(free: list[int], span: int) -> int:
    return sum(f // span for f in free)


def packed_count(sl: Slice, size: int) -> int:
    """How many instances of `size` devices the slice holds (none spans a pod)."""
    return _capacity(list(sl.pods), sl.span(size))


def _fits_pair(sl: Slice, big: int, n_big: int, small: int, n_small: int) -> bool:
    free = pack(sl.pods, sl.span(big), n_big)
    return free is not None and _capacity(free, sl.span(small)) >= n_small


def max_second(sl: Slice, first: int, n_first: int, second: int) -> int:
    """The most instances of `second` devices that fit beside `n_first` of `first` devices, packed
    largest first as planner.placement packs them."""
    if sl.span(first) >= sl.span(second):
        free = pack(sl.pods, sl.span(first), n_first)
        return -1 if free is None else _capacity(free, sl.span(second))
    lo, hi = 0, packed_count(sl, second)  # the second goes first: the largest count leaving room for n_first
    if not _fits_pair(sl, second, 0, first, n_first):
        return -1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _fits_pair(sl, second, mid, first, n_first):
            lo = mid
        else:
            hi = mid - 1
    return lo
