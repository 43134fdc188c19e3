"""The devices a plan may use, and how many instances of a size they hold.

A slice is the first N devices of a topology, counted per pod: an instance never spans a pod (on
CloudMatrix384 a pod is the UB domain; an all-to-all across pods would run over RDMA). The counts
follow planner.placement's rule (largest instance first, first fit pod by pod, whole servers from
one server up), so an instance count the search picks is one placement can lay out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from costmodels.errors import InputError
from costmodels.topology import Topology


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
