"""Named cluster topologies as networkx graphs, with O(1) path bandwidth/latency between devices.

`FAMILIES` is the one list of topology names (`get_topology` parses them, CLI help and error
messages list them): adding a topology is a builder and a `TopologyFamily` line here.

The graph is compact: dies hang off one aggregated scale-up switch node per server (UB L1 /
NVSwitch), servers off one node per scale-up plane (UB L2), and every die off a scale-out
(RDMA / InfiniBand) node. Path figures are computed once per pair class (same chip, same
server, same pod, across pods) on the graph and then looked up.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

import networkx as nx

from costmodels.errors import TopologyError
from costmodels.hardware import A100, ASCEND_910C, B200, CPU_PROCESS, GB200, H100, H200, H800, DeviceSpec

# Hop latencies (us). The papers give end-to-end software floors (XCCL < 20 us, XDS §3.1), which
# comm.py uses; the per-hop figures below only order paths and are assumptions, except where noted.
UB_DIE_HOP_US = 0.5  # assumed: die <-> on-board L1 switch
UB_PLANE_HOP_US = 0.5  # CMI §3 [S]: inter-node adds < 1 us = two L1<->L2 hops of 0.5 us
UB_SERVERS_PER_POD = 48  # XDS §2.2 [P]
CM_NPUS_PER_SERVER = 8  # XDS §2.2 [P]
RDMA_HOP_US = 2.0  # assumed: RoCE NIC + switch
NVLINK_HOP_US = 0.5  # assumed: GPU <-> NVSwitch
IB_HOP_US = 1.5  # assumed: HCA + leaf switch
SHM_HOP_US = 5.0  # nominal: gloo shared-memory copy
GPUS_PER_NODE = 8  # DGX/HGX datasheets: 8-GPU nodes
NVL72_GPUS = 72  # NVIDIA GB200 NVL72 datasheet: 72 Blackwell GPUs in one NVLink domain per rack
MAX_RACKS = 64

MAX_PODS = 16
MAX_NODES = 1024
MAX_LOCAL = 64

# Pair classes, from nearest to farthest.
PAIR_CLASSES = ("die", "device", "server", "pod", "cluster")


@dataclass(frozen=True)
class PathInfo:
    """Bottleneck bandwidth (GB/s per die, one direction), latency (us) and plane of a die-to-die path."""

    bandwidth_gbps: float
    latency_us: float
    plane: str
    hops: int


class Topology:
    """A named cluster: devices (NPU chips / GPUs / processes) made of dies, grouped in servers and pods."""

    def __init__(self, name: str, kind: str, params: dict, hardware: DeviceSpec, devices_per_server: int,
                 servers_per_pod: int, pods: int, graph: nx.Graph, scaleup_scope: str):
        self.name = name
        self.kind = kind
        self.params = dict(params)
        self.hardware = hardware
        self.dies_per_device = hardware.dies
        self.devices_per_server = devices_per_server
        self.servers_per_pod = servers_per_pod
        self.pods = pods
        self.num_servers = servers_per_pod * pods
        self.num_devices = devices_per_server * self.num_servers
        self.num_dies = self.num_devices * self.dies_per_device
        self.devices = list(range(self.num_devices))
        self.graph = graph
        self.scaleup_scope = scaleup_scope  # "pod" (UB) or "server" (NVLink, shm)
        self.paths = self._classify_paths()

    # --- membership -------------------------------------------------------------------------

    def _check_device(self, device: int) -> None:
        if not 0 <= device < self.num_devices:
            raise TopologyError(f"{self.name}: device {device} out of range 0..{self.num_devices - 1}")

    def server_of(self, device: int) -> int:
        self._check_device(device)
        return device // self.devices_per_server

    def pod_of(self, device: int) -> int:
        return self.server_of(device) // self.servers_per_pod

    def dies_of(self, device: int) -> list[int]:
        self._check_device(device)
        return [device * self.dies_per_device + i for i in range(self.dies_per_device)]

    def device_of_die(self, die: int) -> int:
        if not 0 <= die < self.num_dies:
            raise TopologyError(f"{self.name}: die {die} out of range 0..{self.num_dies - 1}")
        return die // self.dies_per_device

    @property
    def scaleup_spans_pod(self) -> bool:
        """The scale-up fabric joins a whole pod (UB), not just the devices of one server (NVLink, shm)."""
        return self.scaleup_scope == "pod"

    @property
    def scaleup_devices(self) -> int:
        """Devices in one scale-up domain (UB: the whole pod; NVLink: one server)."""
        if self.scaleup_spans_pod:
            return self.devices_per_server * self.servers_per_pod
        return self.devices_per_server

    # --- paths ------------------------------------------------------------------------------

    def pair_class(self, a: int, b: int) -> str:
        """How far apart devices a and b are: 'die' (same device), 'server', 'pod' or 'cluster'."""
        if a == b:
            self._check_device(a)
            return "die"
        if self.server_of(a) == self.server_of(b):
            return "server"
        if self.pod_of(a) == self.pod_of(b):
            return "pod"
        return "cluster"

    def bandwidth(self, a: int, b: int) -> float:
        """GB/s one direction from device a to device b (all dies of a device together)."""
        if a == b:
            self._check_device(a)
            return self.hardware.chip_hbm_tbps * 1000.0  # a device talking to itself: its own memory
        return self.paths[self.pair_class(a, b)].bandwidth_gbps * self.dies_per_device

    def latency(self, a: int, b: int) -> float:
        """Path latency (us) from device a to device b (hop latencies only, no software floor)."""
        if a == b:
            self._check_device(a)
            return self.paths["device"].latency_us if "device" in self.paths else 0.0
        return self.paths[self.pair_class(a, b)].latency_us

    def die_path(self, a: int, b: int) -> PathInfo:
        """The path between two dies (die ids, not device ids)."""
        da, db = self.device_of_die(a), self.device_of_die(b)
        if a == b:
            return PathInfo(self.hardware.hbm_tbps * 1000.0, 0.0, "hbm", 0)
        if da == db:
            return self.paths["device"]
        return self.paths[self.pair_class(da, db)]

    def group_bandwidth(self, devices: list[int]) -> float:
        """Slowest device-to-device bandwidth (GB/s, one direction) inside a group of devices."""
        if len(devices) < 2:
            return self.bandwidth(devices[0], devices[0]) if devices else 0.0
        servers = {self.server_of(d) for d in devices}
        pods = {self.pod_of(d) for d in devices}
        cls = "cluster" if len(pods) > 1 else "pod" if len(servers) > 1 else "server"
        return self.paths[cls].bandwidth_gbps * self.dies_per_device

    def offisland_fraction(self, group_dies: int) -> float:
        """Worst-rank share of peers outside its scale-up domain, for `group_dies` contiguous dies."""
        domain = self.scaleup_devices * self.dies_per_device
        if group_dies <= domain:
            return 0.0
        return (group_dies - domain) / (group_dies - 1)

    def _classify_paths(self) -> dict[str, PathInfo]:
        """One representative die pair per class, routed on the graph (scale-up plane preferred)."""
        per_pod = self.devices_per_server * self.servers_per_pod
        reps: dict[str, tuple[int, int]] = {}
        if self.dies_per_device > 1:
            reps["device"] = (0, 1)
        if self.devices_per_server > 1:
            reps["server"] = (0, 1)
        if self.servers_per_pod > 1:
            reps["pod"] = (0, self.devices_per_server)
        if self.pods > 1:
            reps["cluster"] = (0, per_pod)
        paths = {}
        for cls, (a, b) in reps.items():
            die_a = a * self.dies_per_device
            die_b = die_a + 1 if cls == "device" else b * self.dies_per_device
            paths[cls] = _route(self.graph, _die_node(die_a), _die_node(die_b))
        return paths

    # --- identity ---------------------------------------------------------------------------

    def describe(self) -> dict:
        """Canonical description (what the digest hashes)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "params": self.params,
            "hardware": self.hardware.to_dict(),
            "devices": self.num_devices,
            "dies_per_device": self.dies_per_device,
            "devices_per_server": self.devices_per_server,
            "servers_per_pod": self.servers_per_pod,
            "pods": self.pods,
            "paths": {k: [round(v.bandwidth_gbps, 6), round(v.latency_us, 6), v.plane, v.hops]
                      for k, v in sorted(self.paths.items())},
        }

    def digest(self) -> str:
        """sha256 of the canonical description: plans record it to pin the topology they were made for."""
        text = json.dumps(self.describe(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def __repr__(self) -> str:
        return (f"Topology({self.name!r}: {self.num_devices} x {self.hardware.name}, "
                f"{self.dies_per_device} dies each, {self.num_servers} servers, {self.pods} pods)")


# --- graph construction ---------------------------------------------------------------------------


def _die_node(die: int) -> str:
    return f"die/{die}"


def _route(graph: nx.Graph, a: str, b: str) -> PathInfo:
    """Lowest-latency path on the scale-up plane if one exists, else on the scale-out plane."""
    for plane in ("scale-up", "scale-out"):
        view = nx.subgraph_view(graph, filter_edge=lambda u, v, p=plane: graph.edges[u, v]["plane"] == p)
        if a in view and b in view and nx.has_path(view, a, b):
            path = nx.shortest_path(view, a, b, weight="latency_us")
            edges = [graph.edges[u, v] for u, v in zip(path, path[1:])]
            return PathInfo(
                bandwidth_gbps=min(e["bandwidth_gbps"] for e in edges),
                latency_us=sum(e["latency_us"] for e in edges),
                plane=edges[0]["fabric"],
                hops=len(edges),
            )
    raise TopologyError(f"no path between {a} and {b}; the topology graph is disconnected")  # internal


def _add(graph: nx.Graph, u: str, v: str, bw: float, lat: float, plane: str, fabric: str) -> None:
    graph.add_edge(u, v, bandwidth_gbps=bw, latency_us=lat, plane=plane, fabric=fabric)


def _cloudmatrix(pods: int) -> Topology:
    """48 servers x 8 Ascend 910C (2 dies) per pod; UB L1 per server, UB L2 planes per pod; RDMA."""
    hw = ASCEND_910C
    g = nx.Graph()
    dies_per_server = CM_NPUS_PER_SERVER * hw.dies
    # One aggregated node stands for a server's 7 L1 chips and one for a pod's 7 L2 sub-planes:
    # the uplink (7 x 448 GB/s = 16 dies x 196 GB/s, CMI Fig. 4-5) is not oversubscribed.
    uplink = dies_per_server * hw.scaleup_gbps
    for pod in range(pods):
        l2 = f"ub-l2/{pod}"
        rdma = f"rdma/{pod}"
        for s in range(UB_SERVERS_PER_POD):
            server = pod * UB_SERVERS_PER_POD + s
            l1 = f"ub-l1/{server}"
            _add(g, l1, l2, uplink, UB_PLANE_HOP_US, "scale-up", "UB")
            for i in range(dies_per_server):
                die = _die_node(server * dies_per_server + i)
                _add(g, die, l1, hw.scaleup_gbps, UB_DIE_HOP_US, "scale-up", "UB")
                _add(g, die, rdma, hw.scaleout_gbps, RDMA_HOP_US, "scale-out", "RoCE")
        if pods > 1:  # non-blocking RDMA spine between pods (assumed)
            _add(g, rdma, "rdma/spine", UB_SERVERS_PER_POD * dies_per_server * hw.scaleout_gbps,
                 RDMA_HOP_US, "scale-out", "RoCE")
    name = "cloudmatrix384" if pods == 1 else f"cloudmatrix384:{pods}"
    return Topology(name, "cloudmatrix384", {"pods": pods}, hw, CM_NPUS_PER_SERVER, UB_SERVERS_PER_POD, pods,
                    nx.freeze(g), scaleup_scope="pod")


def _gpu_cluster(hw: DeviceSpec, prefix: str, nodes: int, gpus_per_node: int = GPUS_PER_NODE,
                 kind: str | None = None, param: str = "nodes") -> Topology:
    """N nodes of `gpus_per_node` GPUs: NVSwitch inside a node (one NVLink domain), one non-blocking
    InfiniBand fabric between nodes. GB200 NVL72 is a "node" of 72 GPUs: its rack is one NVLink domain."""
    g = nx.Graph()
    for n in range(nodes):
        nvs = f"nvswitch/{n}"
        for i in range(gpus_per_node):
            die = _die_node(n * gpus_per_node + i)
            _add(g, die, nvs, hw.scaleup_gbps, NVLINK_HOP_US, "scale-up", "NVLink")
            _add(g, die, "ib", hw.scaleout_gbps, IB_HOP_US, "scale-out", "InfiniBand")
    kind = kind or f"{prefix}-cluster"
    return Topology(f"{kind}:{nodes}", kind, {param: nodes}, hw, gpus_per_node, nodes, 1,
                    nx.freeze(g), scaleup_scope="server")


def _gpu_host(hw: DeviceSpec, prefix: str, gpus: int) -> Topology:
    """N GPUs of one host on NVLink/NVSwitch (no scale-out): what `podplan run` executes with NCCL."""
    g = nx.Graph()
    for i in range(gpus):
        _add(g, _die_node(i), "nvswitch/0", hw.scaleup_gbps, NVLINK_HOP_US, "scale-up", "NVLink")
    return Topology(f"{prefix}:{gpus}", prefix, {"gpus": gpus}, hw, gpus, 1, 1, nx.freeze(g), scaleup_scope="server")


def _host(hw: DeviceSpec, prefix: str) -> Callable[[int], Topology]:
    return lambda gpus: _gpu_host(hw, prefix, gpus)


# the single-host GPU families: plans for them run on this host (`podplan run`, NCCL)
HOST_GPU_KINDS = ("h100", "h200")


def _local(procs: int) -> Topology:
    """N CPU processes on one host talking through shared memory (gloo)."""
    hw = CPU_PROCESS
    g = nx.Graph()
    g.add_node("host")
    for i in range(procs):
        _add(g, _die_node(i), "host", hw.scaleup_gbps, SHM_HOP_US, "scale-up", "shm")
    return Topology(f"local:{procs}", "local", {"processes": procs}, hw, procs, 1, 1, nx.freeze(g),
                    scaleup_scope="server")


@dataclass(frozen=True)
class TopologyFamily:
    """Topologies named `kind` or `kind:N`, built by `build(N)`.

    `default` is N when the name has none (None: N is required); N must be in 1..`limit`.
    """

    kind: str
    letter: str  # how help and errors write N ("K" pods, "N" nodes)
    counts: str  # what N counts, for errors: "pod", "node", "process"
    limit: int
    default: int | None
    about: str  # what N means, for help and errors
    build: Callable[[int], Topology]

    @property
    def usage(self) -> str:
        """'h100-cluster:N', or 'cloudmatrix384[:K]' when the count is optional."""
        suffix = f"[:{self.letter}]" if self.default is not None else f":{self.letter}"
        return self.kind + suffix

    def describe(self) -> str:
        """The family in an error message: 'cloudmatrix384, cloudmatrix384:K (K SuperPods ...)'."""
        names = f"{self.kind}, {self.kind}:{self.letter}" if self.default is not None else f"{self.kind}:{self.letter}"
        return f"{names} ({self.about})"


def _gpus(hw: DeviceSpec, prefix: str) -> Callable[[int], Topology]:
    return lambda nodes: _gpu_cluster(hw, prefix, nodes)


def _nvl72(racks: int) -> Topology:
    return _gpu_cluster(GB200, "gb200", racks, NVL72_GPUS, kind="gb200-nvl72", param="racks")


FAMILIES: tuple[TopologyFamily, ...] = (
    TopologyFamily("cloudmatrix384", "K", "pod", MAX_PODS, 1, "K SuperPods joined by RDMA", _cloudmatrix),
    TopologyFamily("h100-cluster", "N", "node", MAX_NODES, None, "N nodes of 8 H100 GPUs", _gpus(H100, "h100")),
    TopologyFamily("h800-cluster", "N", "node", MAX_NODES, None, "N nodes of 8 H800 GPUs", _gpus(H800, "h800")),
    TopologyFamily("h200-cluster", "N", "node", MAX_NODES, None, "N nodes of 8 H200 GPUs", _gpus(H200, "h200")),
    TopologyFamily("a100-cluster", "N", "node", MAX_NODES, None, "N nodes of 8 A100 GPUs", _gpus(A100, "a100")),
    TopologyFamily("b200-cluster", "N", "node", MAX_NODES, None, "N nodes of 8 B200 GPUs", _gpus(B200, "b200")),
    TopologyFamily("gb200-nvl72", "N", "rack", MAX_RACKS, None, "N GB200 NVL72 racks of 72 GPUs, one NVLink "
                   "domain each", _nvl72),
    TopologyFamily("h100", "N", "GPU", GPUS_PER_NODE, None, "N H100 GPUs of one host, on NVLink", _host(H100, "h100")),
    TopologyFamily("h200", "N", "GPU", GPUS_PER_NODE, None, "N H200 GPUs of one host, on NVLink", _host(H200, "h200")),
    TopologyFamily("local", "N", "process", MAX_LOCAL, None, "N CPU processes on this host", _local),
)
_FAMILY = {f.kind: f for f in FAMILIES}
VALID_NAMES = ", ".join(f.describe() for f in FAMILIES)
_NAME = re.compile(r"([a-z0-9-]+)(?::(\d+))?")


def topology_names() -> str:
    """The names `get_topology` accepts, for CLI help: 'cloudmatrix384[:K], h100-cluster:N, ...'."""
    return ", ".join(f.usage for f in FAMILIES)


def _count(name: str, text: str | None, family: TopologyFamily) -> int:
    if text is None:
        if family.default is not None:
            return family.default
        raise TopologyError(f"topology '{name}' needs a {family.counts} count ('{name}:N'); valid: {VALID_NAMES}")
    value = int(text)
    if not 1 <= value <= family.limit:
        raise TopologyError(f"topology '{name}': {family.counts} count must be 1..{family.limit}, got {value}; "
                            f"valid: {VALID_NAMES}")
    return value


@functools.lru_cache(maxsize=32)
def get_topology(name: str) -> Topology:
    """Build (once, then cached) the topology called `name`; unknown names raise TopologyError."""
    if not isinstance(name, str):
        raise TopologyError(f"topology name must be a string; valid: {VALID_NAMES}")
    m = _NAME.fullmatch(name.strip().lower())
    family = _FAMILY.get(m.group(1)) if m else None
    if m is None or family is None:
        raise TopologyError(f"unknown topology '{name}'; valid: {VALID_NAMES}")
    return family.build(_count(name, m.group(2), family))


# --- heterogeneous topologies: named groups joined by the scale-out network ----------------------

# A mixed topology is written GROUP+GROUP ("h100-cluster:8+h200-cluster:8"): each group is a topology
# above, with its own hardware and scale-up fabric. Groups reach each other only over the scale-out
# network (RDMA / InfiniBand): a device's NIC is the bottleneck of any inter-group path, so the link
# between groups runs at the slower of the two groups' per-device scale-out bandwidth (hardware.py
# sources each: 400 Gb/s InfiniBand per GPU on DGX/HGX nodes, 200 Gb/s RoCE per 910C die).
MAX_GROUPS = 4
# assumed: NIC + leaf + spine + leaf + NIC between two clusters on one scale-out fabric (three switch
# hops of IB_HOP_US; RDMA_HOP_US when either end is RoCE)
INTERGROUP_HOPS = 3


@dataclass(frozen=True)
class TopologyGroup:
    """One group of a mixed topology: a named topology and where its devices start in the mixed numbering."""

    name: str  # the group's topology name, e.g. "h200-cluster:8"; unique in the mixed topology
    topology: Topology
    first_device: int

    @property
    def devices(self) -> range:
        return range(self.first_device, self.first_device + self.topology.num_devices)


class MixedTopology:
    """Groups of devices, each group a homogeneous `Topology`; devices are numbered group after group.

    The planner serves each phase on one group's hardware (planner/hetero.py); only the KV-cache transfer
    of a request from its prefill group to its decode group crosses between groups.
    """

    def __init__(self, groups: tuple[Topology, ...]):
        first = 0
        out = []
        for topo in groups:
            out.append(TopologyGroup(topo.name, topo, first))
            first += topo.num_devices
        self.groups: tuple[TopologyGroup, ...] = tuple(out)
        self.name = "+".join(g.name for g in self.groups)
        self.num_devices = first

    def group(self, name: str) -> TopologyGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise TopologyError(f"{self.name}: no group '{name}'; groups: {', '.join(g.name for g in self.groups)}")

    def group_of(self, device: int) -> TopologyGroup:
        for g in self.groups:
            if device in g.devices:
                return g
        raise TopologyError(f"{self.name}: device {device} out of range 0..{self.num_devices - 1}")

    def link_gbps(self, a: str, b: str) -> float:
        """GB/s one direction per device between groups a and b: the slower NIC of the two ends."""
        ha, hb = self.group(a).topology, self.group(b).topology
        return min(ha.hardware.chip_scaleout_gbps, hb.hardware.chip_scaleout_gbps)

    def link_latency_us(self, a: str, b: str) -> float:
        """Hop latency (us) between a device of group a and one of group b (assumed, see INTERGROUP_HOPS)."""
        fabrics = {self.group(a).topology.hardware.scaleout_fabric, self.group(b).topology.hardware.scaleout_fabric}
        hop = RDMA_HOP_US if "RoCE" in fabrics else IB_HOP_US
        return INTERGROUP_HOPS * hop

    def describe(self) -> dict:
        """Canonical description: each group's own description, and the inter-group links."""
        return {
            "name": self.name,
            "groups": [g.topology.describe() for g in self.groups],
            "links": [[a.name, b.name, round(self.link_gbps(a.name, b.name), 6),
                       round(self.link_latency_us(a.name, b.name), 6)]
                      for i, a in enumerate(self.groups) for b in self.groups[i + 1:]],
        }

    def digest(self) -> str:
        text = json.dumps(self.describe(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def __repr__(self) -> str:
        return f"MixedTopology({self.name!r}: " + ", ".join(
            f"{g.topology.num_devices} x {g.topology.hardware.name}" for g in self.groups) + ")"


MIXED_USAGE = "GROUP+GROUP (e.g. h100-cluster:8+h200-cluster:8: prefill and decode may run on different hardware)"


@functools.lru_cache(maxsize=32)
def get_any_topology(name: str) -> Topology | MixedTopology:
    """`get_topology`, or a MixedTopology for a name of '+'-joined groups; bad names raise TopologyError."""
    if not isinstance(name, str):
        raise TopologyError(f"topology name must be a string; valid: {VALID_NAMES}")
    if "+" not in name:
        return get_topology(name)
    parts = [p.strip() for p in name.split("+")]
    for i, part in enumerate(parts):
        if not part:
            raise TopologyError(f"topology '{name}': group {i + 1} is empty; write {MIXED_USAGE}")
    if len(parts) > MAX_GROUPS:
        raise TopologyError(f"topology '{name}': {len(parts)} groups, at most {MAX_GROUPS}; drop one")
    groups = []
    for i, part in enumerate(parts):
        try:
            groups.append(get_topology(part))
        except TopologyError:
            raise TopologyError(f"topology '{name}': group {i + 1} '{part}' is not a topology; each group is one "
                                f"of {topology_names()}") from None
    names = [g.name for g in groups]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise TopologyError(f"topology '{name}': group '{dup}' given twice; a group is one named topology "
                            f"(use {dup.split(':')[0]}:N with a larger N for more of it)")
    for g in groups:
        if g.hardware.scaleout_gbps <= 0:
            raise TopologyError(f"topology '{name}': group '{g.name}' has no scale-out network ({g.hardware.name}), "
                                "so nothing can reach it from another group; use cluster topologies as groups")
        if g.pods > 1:
            raise TopologyError(f"topology '{name}': group '{g.name}' has {g.pods} pods; a group is one pod or one "
                                f"GPU cluster for now: use {g.kind} as the group")
    dies = {g.dies_per_device for g in groups}
    if len(dies) > 1:
        # the Plan IR counts parallel degrees in dies with one dies-per-device for the whole plan
        raise TopologyError(f"topology '{name}': groups mix {' and '.join(str(d) for d in sorted(dies))} dies per "
                            "device, which one plan cannot describe yet; mix groups of one die count")
    return MixedTopology(tuple(groups))
