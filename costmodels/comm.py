"""Communication cost: MoE dispatch/combine, AFD attention<->expert transfers, TP collectives, KV transfer.

Every transfer is priced as a latency term plus a bandwidth term. Latency = the software floor of
one collective (XCCL, XDS §3.1) + the hop latencies of the farthest path inside the group (the
topology's per-hop figures). Bandwidth = bytes of the slowest rank over an effective bandwidth
derived from the published operator measurements below (each measured time minus its latency
term), so the model reproduces every measured point exactly. `*_parts` functions return the two
terms; the `*_us` functions their sum.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

from costmodels import profiles
from costmodels.opcount import expected_distinct
from costmodels.errors import InputError, TopologyError
from costmodels.hardware import ASCEND_910C, CPU_PROCESS, H800, DeviceSpec, dtype_bytes
from costmodels.topology import (
    GPUS_PER_NODE as GPUS_PER_HGX_NODE, IB_HOP_US, NVLINK_HOP_US, UB_DIE_HOP_US, UB_PLANE_HOP_US, Topology,
)

# --- measured operators (CMI Table 6, DeepEP README, XDS §3.1/§3.3) --------------------------------

# Every all-to-all row below was measured with 128 tokens per rank, top-8, hidden 7,168,
# INT8/FP8 dispatch (one fp32 scale per token) and BF16 combine.
MEASURED_TOKENS = 128
MEASURED_TOP_K = 8
MEASURED_HIDDEN = 7168

# XCCL point-to-point: < 20 us end to end for messages < 1 MB (XDS §3.1 [P]). Used as the
# latency floor of every collective; DeepEP publishes no small-message figure, so GPUs reuse it.
FLOOR_US = 20.0

# (EP, dispatch us, combine us), CMI Table 6 [S]: 116/118 us at EP8, 152/149 us at EP256 on UB.
ASCEND_A2A_US = ((8, 116.0, 118.0), (256, 152.0, 149.0))
# (EP, dispatch us, combine us), DeepEP README [P] on H800 (low-latency kernels, RDMA).
DEEPEP_H800_A2A_US = ((8, 77.0, 114.0), (32, 155.0, 273.0), (128, 192.0, 369.0), (256, 194.0, 360.0))
# xDeepServe AFD, XDS §3.3 [P]: attention->expert 172 us, expert->attention 193 us per layer,
# batch 96 per attention die, 480 attention dies, 288 MoE dies (256 routed + 32 shared, one each).
XDS_AFD_A2E_US = 172.0
XDS_AFD_E2A_US = 193.0
XDS_AFD_BATCH = 96
XDS_AFD_ATTN_DIES = 480
XDS_AFD_MOE_DIES = 288
XDS_AFD_DESTS = MEASURED_TOP_K + 1  # 8 routed + the shared expert on its own dies


def dispatch_dest_bytes(hidden: int, act_dtype: str) -> float:
    """Bytes of one token to one expert in dispatch: hidden state, a per-token scale if quantised, routing.

    The same message as `opcount.dispatch_bytes_per_token` / top-k.
    """
    # one fp32 scale per token (CMI: 7,168 + scale); FP4 formats carry their block scales in dtype_bytes
    scale = 4.0 if act_dtype in ("int8", "fp8") else 0.0
    return hidden * dtype_bytes(act_dtype) + scale + 8.0  # + int32 expert id + fp32 weight (opcount)


def combine_dest_bytes(hidden: int) -> float:
    """Bytes of one expert output back to its token: BF16 (CMI §3, DeepEP)."""
    return hidden * 2.0


_MEASURED_DISPATCH_BYTES = MEASURED_TOKENS * MEASURED_TOP_K * dispatch_dest_bytes(MEASURED_HIDDEN, "int8")
_MEASURED_COMBINE_BYTES = MEASURED_TOKENS * MEASURED_TOP_K * combine_dest_bytes(MEASURED_HIDDEN)


@dataclass(frozen=True)
class A2AProfile:
    """Effective all-to-all bandwidth (GB/s per rank) by EP size, derived from measured times.

    bw(EP) = measured bytes / (measured time - FLOOR_US): the model then reproduces each
    measured point exactly; between points 1/bw is interpolated linearly in log2(EP).
    """

    fabric: str
    dispatch: tuple[tuple[int, float], ...]  # (EP, GB/s)
    combine: tuple[tuple[int, float], ...]
    source: str
    measured_on: DeviceSpec  # the device whose scale-up link the measurements ran on
    server_ep: int  # the measured EP that stays inside one server (the scale-up link alone)
    spans_scaleout: bool  # the larger measured EPs already crossed the scale-out fabric

    def bandwidth(self, op: str, ep: int) -> float:
        points = self.dispatch if op == "dispatch" else self.combine
        return _interp_bw(points, ep)


def _interp_bw(points: tuple[tuple[int, float], ...], ep: int) -> float:
    if ep <= points[0][0]:
        return points[0][1]
    if ep >= points[-1][0]:
        return points[-1][1]
    x = math.log2(ep)
    for (e0, b0), (e1, b1) in zip(points, points[1:]):
        if e0 <= ep <= e1:
            t = (x - math.log2(e0)) / (math.log2(e1) - math.log2(e0))
            return 1.0 / ((1 - t) / b0 + t / b1)  # interpolate time per byte, not bandwidth
    raise AssertionError("unreachable: points are sorted")


def _gbps(nbytes: float, us: float, path_us: float = 0.0) -> float:
    """Bandwidth that moves `nbytes` in `us` once the floor and the path's hop latency are paid."""
    return nbytes / ((us - FLOOR_US - path_us) * 1e-6) / 1e9


# Hop latency of the farthest path in each measured layout (costmodels/topology.py hop figures):
# UB inside one server die -> L1 -> die; across servers die -> L1 -> L2 -> L1 -> die (CMI §3 [S]: < 1 us
# extra across nodes); H800 inside one node GPU -> NVSwitch -> GPU; across nodes GPU -> IB -> GPU.
UB_SERVER_PATH_US = 2 * UB_DIE_HOP_US
UB_POD_PATH_US = 2 * UB_DIE_HOP_US + 2 * UB_PLANE_HOP_US
NV_NODE_PATH_US = 2 * NVLINK_HOP_US
IB_PATH_US = 2 * IB_HOP_US


def _derive(rows: tuple[tuple[int, float, float], ...], fabric: str, source: str, measured_on: DeviceSpec,
            spans_scaleout: bool, path_us: Callable[[int], float]) -> A2AProfile:
    return A2AProfile(
        fabric=fabric,
        dispatch=tuple((ep, _gbps(_MEASURED_DISPATCH_BYTES, d, path_us(ep))) for ep, d, _ in rows),
        combine=tuple((ep, _gbps(_MEASURED_COMBINE_BYTES, c, path_us(ep))) for ep, _, c in rows),
        source=source, measured_on=measured_on, server_ep=rows[0][0], spans_scaleout=spans_scaleout,
    )


# CMI's EP8..EP256 all stay inside one SuperPod's UB plane.
# CMI's EP8 is 4 NPUs of one server (16 dies each); EP256 spans 8 servers.
ASCEND_UB_PROFILE = _derive(ASCEND_A2A_US, "UB", "CMI Table 6 [S] with XDS §3.1 floor", ASCEND_910C,
                            spans_scaleout=False,
                            path_us=lambda ep: UB_SERVER_PATH_US if ep <= 16 else UB_POD_PATH_US)
# H100/H200 clusters reuse H800's: beyond one node the same 400 Gb/s NIC per GPU bounds EP > 8.
NVIDIA_IB_PROFILE = _derive(DEEPEP_H800_A2A_US, "NVLink+InfiniBand", "DeepEP README (H800) [P] with XDS §3.1 floor",
                            H800, spans_scaleout=True,
                            path_us=lambda ep: NV_NODE_PATH_US if ep <= 8 else IB_PATH_US)
# Nominal for local CPU processes: gloo over shared memory (never calibrated).
LOCAL_PROFILE = A2AProfile("shm", ((1, 5.0),), ((1, 5.0),), "nominal", CPU_PROCESS, server_ep=1,
                           spans_scaleout=False)
# Scale-up fabric (DeviceSpec.scaleup_fabric) -> the profile measured on it.
PROFILES: dict[str, A2AProfile] = {"UB": ASCEND_UB_PROFILE, "NVLink": NVIDIA_IB_PROFILE, "shm": LOCAL_PROFILE}


def profile_for(topo: Topology) -> A2AProfile:
    """The measured all-to-all profile of the topology's scale-up fabric."""
    fabric = topo.hardware.scaleup_fabric
    if fabric not in PROFILES:
        raise TopologyError(f"{topo.name}: no measured all-to-all profile for the {fabric} fabric of "
                            f"{topo.hardware.name}; add one to costmodels.comm.PROFILES")
    return PROFILES[fabric]


@functools.lru_cache(maxsize=64)
def collective_efficiency(profile: A2AProfile) -> float:
    """Achieved / link bandwidth for bulk collectives: the one-server combine of the fabric's profile [D].

    CMI Table 6 EP8 combine (one server, UB) and DeepEP EP8 combine (one node, NVLink) are the
    measured large-message transfers that stay on the scale-up link.
    """
    return min(1.0, profile.bandwidth("combine", profile.server_ep) / profile.measured_on.scaleup_gbps)


# --- MoE all-to-all --------------------------------------------------------------------------------


def _check(**values: float) -> None:
    for name, v in values.items():
        if not (v >= 0 and math.isfinite(v)):
            raise InputError(f"communication cost: {name} must be a finite number >= 0, got {v}")


def path_latency_us(topo: Topology, group_dies: int) -> float:
    """Hop latency of the farthest path inside a contiguous group of `group_dies` dies (topology figures)."""
    if group_dies <= 1:
        return 0.0
    per_server = topo.devices_per_server * topo.dies_per_device
    if group_dies <= topo.dies_per_device:
        cls = "device"
    elif group_dies <= per_server:
        cls = "server"
    elif group_dies <= per_server * topo.servers_per_pod:
        cls = "pod"
    else:
        cls = "cluster"
    order = ("device", "server", "pod", "cluster")
    for c in order[order.index(cls):] + order[:order.index(cls)][::-1]:  # the class, else the nearest farther/closer
        if c in topo.paths:
            return topo.paths[c].latency_us
    return 0.0


def _a2a_bandwidth(topo: Topology, op: str, ep: int) -> float:
    """Effective all-to-all GB/s per rank for `ep` ranks on this topology's hardware.

    The measured profile, scaled to this device by the link that bounds it. For the NVIDIA profile:
    a group inside one NVLink domain (one 8-GPU HGX node, or a whole GB200 NVL72 rack) moves over
    NVLink, priced as the measured one-node (EP8) operator scaled by NVLink bandwidth (H800 400 GB/s
    -> H100/H200 900 GB/s, B200/GB200 NVLink 5 1.8 TB/s bidirectional, spec sheets), i.e. the link
    at the efficiency DeepEP reached on H800's NVLink; a group spanning nodes is bounded by the
    scale-out NIC (A100's 200 Gb/s HDR halves it).
    """
    profile = profile_for(topo)
    hw = topo.hardware
    bw = profile.bandwidth(op, ep)
    if profile.spans_scaleout and not topo.scaleup_spans_pod:
        domain = topo.scaleup_devices * topo.dies_per_device
        if ep <= domain:
            return profile.bandwidth(op, profile.server_ep) * hw.scaleup_gbps / profile.measured_on.scaleup_gbps
        if hw.scaleout_gbps > 0 and profile.measured_on.scaleout_gbps > 0:
            bw *= hw.scaleout_gbps / profile.measured_on.scaleout_gbps
    return bw


def all_to_all_parts(topo: Topology, op: str, tokens_per_rank: float, dests_per_token: float,
                     bytes_per_dest: float, ep: int, imbalance: float = 1.0) -> tuple[float, float]:
    """(latency, transfer) in us of one MoE dispatch or combine (op) across `ep` ranks (dies), slowest rank.

    tokens_per_rank: tokens each rank routes (per microbatch); dests_per_token: top-k (+1 for a
    shared expert on its own dies); imbalance: max/mean received load, >= 1, multiplies the bytes.
    Off-island traffic (other pods on CloudMatrix, other nodes beyond the measured layouts) is
    bounded by the scale-out link as well.
    """
    _check(tokens_per_rank=tokens_per_rank, dests_per_token=dests_per_token, bytes_per_dest=bytes_per_dest)
    if op not in ("dispatch", "combine"):
        raise InputError(f"communication cost: op must be dispatch or combine, got {op!r}")
    if imbalance < 1.0:
        raise InputError(f"communication cost: imbalance is max/mean load and must be >= 1, got {imbalance}")
    if ep <= 1 or tokens_per_rank == 0:
        return 0.0, 0.0
    nbytes = tokens_per_rank * dests_per_token * bytes_per_dest * imbalance
    profile = profile_for(topo)
    transfer = nbytes / (_a2a_bandwidth(topo, op, ep) * 1e3)  # GB/s -> bytes/us
    off = topo.offisland_fraction(ep)
    if off > 0 and not profile.spans_scaleout and topo.hardware.scaleout_gbps > 0:
        # measured inside one scale-up island (K CloudMatrix SuperPods): the share bound for
        # other islands crosses the scale-out link (RDMA, 25 GB/s per die)
        transfer = max(transfer, off * nbytes / (topo.hardware.scaleout_gbps * 1e3))
    return FLOOR_US + path_latency_us(topo, ep), transfer


def all_to_all_us(topo: Topology, op: str, tokens_per_rank: float, dests_per_token: float,
                  bytes_per_dest: float, ep: int, imbalance: float = 1.0) -> float:
    """One MoE dispatch or combine in us: latency + transfer of `all_to_all_parts`."""
    return sum(all_to_all_parts(topo, op, tokens_per_rank, dests_per_token, bytes_per_dest, ep, imbalance))


# DeepEP normal (high-throughput) kernels, the ones prefill runs: "bottleneck bandwidth" on H800 with one
# CX7 400 Gb/s NIC per GPU (DeepEP docs/legacy.md, "Normal kernels with NVLink and RDMA forwarding", 4,096
# tokens, hidden 7,168, top-8, FP8 dispatch, BF16 combine). A token crosses RDMA once per distinct
# destination node (then NVLink forwards it to the GPUs there), and NVLink once per distinct destination
# GPU inside one node; the bandwidths are per GPU over those bytes.
DEEPEP_NORMAL_NVLINK_GBPS = (153.0, 158.0)  # (dispatch, combine), intranode EP8
DEEPEP_NORMAL_RDMA_GBPS = ((16, 43.0, 43.0), (32, 58.0, 57.0), (64, 51.0, 50.0))  # (EP, dispatch, combine)


def normal_a2a_parts(topo: Topology, op: str, tokens_per_rank: float, top_k: int, bytes_per_dest: float,
                     ep: int, imbalance: float = 1.0) -> tuple[float, float] | None:
    """(latency, transfer) of a prefill dispatch/combine on DeepEP's normal kernels, or None where none
    are measured for the fabric (Ascend UB: the low-latency profile prices prefill too).

    Bytes count distinct destinations, not top-k copies: nodes over RDMA when the group spans nodes,
    GPUs over NVLink inside one node; bandwidths scale from H800 by the bounding link.
    """
    if profile_for(topo) is not NVIDIA_IB_PROFILE or ep <= 1 or tokens_per_rank <= 0:
        return None
    hw = topo.hardware
    k = 0 if op == "dispatch" else 1
    node = topo.scaleup_devices * topo.dies_per_device
    latency = FLOOR_US + path_latency_us(topo, ep)
    if ep <= node:  # one NVLink domain (an HGX node, or a GB200 NVL72 rack)
        dests = expected_distinct(ep, top_k)
        bw = DEEPEP_NORMAL_NVLINK_GBPS[k] * hw.scaleup_gbps / H800.scaleup_gbps
    else:
        dests = expected_distinct(math.ceil(ep / node), top_k)
        measured = tuple((e, (d, c)[k]) for e, d, c in DEEPEP_NORMAL_RDMA_GBPS)
        bw = _interp_bw(measured, ep) * hw.scaleout_gbps / H800.scaleout_gbps
    nbytes = tokens_per_rank * dests * bytes_per_dest * imbalance
    return latency, nbytes / (bw * 1e3)


def dispatch_parts(topo: Topology, tokens_per_rank: float, hidden: int, act_dtype: str, dests_per_token: float,
                   ep: int, imbalance: float = 1.0) -> tuple[float, float]:
    """(latency, transfer) of a MoE dispatch."""
    return all_to_all_parts(topo, "dispatch", tokens_per_rank, dests_per_token,
                            dispatch_dest_bytes(hidden, act_dtype), ep, imbalance)


def combine_parts(topo: Topology, tokens_per_rank: float, hidden: int, dests_per_token: float, ep: int,
                  imbalance: float = 1.0) -> tuple[float, float]:
    """(latency, transfer) of a MoE combine (BF16 expert outputs)."""
    return all_to_all_parts(topo, "combine", tokens_per_rank, dests_per_token, combine_dest_bytes(hidden), ep,
                            imbalance)


def dispatch_us(topo: Topology, tokens_per_rank: float, hidden: int, act_dtype: str, dests_per_token: float,
                ep: int, imbalance: float = 1.0) -> float:
    """MoE dispatch (attention -> experts) of `tokens_per_rank` tokens, activations in `act_dtype`."""
    return all_to_all_us(topo, "dispatch", tokens_per_rank, dests_per_token,
                         dispatch_dest_bytes(hidden, act_dtype), ep, imbalance)


def combine_us(topo: Topology, tokens_per_rank: float, hidden: int, dests_per_token: float, ep: int,
               imbalance: float = 1.0) -> float:
    """MoE combine (experts -> attention), BF16 expert outputs."""
    return all_to_all_us(topo, "combine", tokens_per_rank, dests_per_token, combine_dest_bytes(hidden), ep, imbalance)


# --- disaggregated MoE-attention (AFD) ------------------------------------------------------------


def _afd_bw(one_way_us: float, bytes_per_dest: float) -> float:
    """GB/s of the XDS §3.3 measurement, priced on its bottleneck side (the MoE die receiving)."""
    recv_tokens = XDS_AFD_ATTN_DIES * XDS_AFD_BATCH * XDS_AFD_DESTS / XDS_AFD_MOE_DIES
    return _gbps(recv_tokens * bytes_per_dest, one_way_us, UB_POD_PATH_US)  # attention and MoE dies: other servers


AFD_A2E_GBPS = _afd_bw(XDS_AFD_A2E_US, dispatch_dest_bytes(MEASURED_HIDDEN, "int8"))  # [D] XDS §3.3
AFD_E2A_GBPS = _afd_bw(XDS_AFD_E2A_US, combine_dest_bytes(MEASURED_HIDDEN))  # [D] XDS §3.3


def disaggregated_transfer_parts(topo: Topology, direction: str, sent_tokens_per_attn_die: float,
                                 recv_tokens_per_moe_die: float, bytes_per_dest: float,
                                 imbalance: float = 1.0) -> tuple[float, float]:
    """(latency, transfer) in us of one-way attention->expert ('a2e') or expert->attention ('e2a') traffic
    for one layer.

    Both sides are priced; the slower (usually the MoE die receiving from many attention dies)
    sets the time. Token counts are token-expert pairs (a token sent to k experts counts k times).
    The latency is the floor plus the farthest path of the topology (attention and MoE dies sit in
    different servers).
    """
    _check(sent=sent_tokens_per_attn_die, recv=recv_tokens_per_moe_die, bytes_per_dest=bytes_per_dest)
    if direction not in ("a2e", "e2a"):
        raise InputError(f"communication cost: AFD direction must be a2e or e2a, got {direction!r}")
    if sent_tokens_per_attn_die == 0 and recv_tokens_per_moe_die == 0:
        return 0.0, 0.0
    bw = (AFD_A2E_GBPS if direction == "a2e" else AFD_E2A_GBPS) * _disaggregated_fabric_scale(topo)
    nbytes = max(sent_tokens_per_attn_die, recv_tokens_per_moe_die * imbalance) * bytes_per_dest
    return FLOOR_US + path_latency_us(topo, topo.num_dies), nbytes / (bw * 1e3)


def disaggregated_transfer_us(topo: Topology, direction: str, sent_tokens_per_attn_die: float,
                              recv_tokens_per_moe_die: float, bytes_per_dest: float, imbalance: float = 1.0) -> float:
    """One-way AFD transfer in us: latency + transfer of `disaggregated_transfer_parts`."""
    return sum(disaggregated_transfer_parts(topo, direction, sent_tokens_per_attn_die, recv_tokens_per_moe_die,
                                            bytes_per_dest, imbalance))


def _disaggregated_fabric_scale(topo: Topology) -> float:
    """AFD bandwidth relative to the measured fabric (CloudMatrix UB), by the link the traffic takes."""
    if topo.scaleup_spans_pod:  # attention and MoE dies share the pod-wide scale-up plane
        return topo.hardware.scaleup_gbps / ASCEND_910C.scaleup_gbps
    # server-wide scale-up (GPU): most attention GPUs sit in other nodes than the MoE GPU, so
    # the scale-out link (InfiniBand) bounds it
    link = topo.hardware.scaleout_gbps or topo.hardware.scaleup_gbps
    return link / ASCEND_910C.scaleup_gbps


# --- tensor-parallel collectives and KV transfer --------------------------------------------------


def all_reduce_parts(topo: Topology, nbytes: float, group_dies: int) -> tuple[float, float]:
    """(latency, transfer) in us of a ring all-reduce of `nbytes` per rank over `group_dies` contiguous dies."""
    _check(nbytes=nbytes)
    if group_dies <= 1 or nbytes == 0:
        return 0.0, 0.0
    return (FLOOR_US + path_latency_us(topo, group_dies),
            2.0 * (group_dies - 1) / group_dies * nbytes / (_group_bw(topo, group_dies) * 1e3))


def all_reduce_us(topo: Topology, nbytes: float, group_dies: int) -> float:
    """Ring all-reduce of `nbytes` per rank over `group_dies` contiguous dies."""
    return sum(all_reduce_parts(topo, nbytes, group_dies))


def all_gather_us(topo: Topology, nbytes_total: float, group_dies: int) -> float:
    """Ring all-gather (or reduce-scatter) of a `nbytes_total` tensor over `group_dies` dies."""
    _check(nbytes=nbytes_total)
    if group_dies <= 1 or nbytes_total == 0:
        return 0.0
    return FLOOR_US + path_latency_us(topo, group_dies) + (group_dies - 1) / group_dies * nbytes_total / (
        _group_bw(topo, group_dies) * 1e3)


def _group_bw(topo: Topology, group_dies: int) -> float:
    """Per-die GB/s inside a contiguous group: scale-up link unless it spills off the island."""
    hw = topo.hardware
    inside = topo.offisland_fraction(group_dies) == 0 or not hw.scaleout_gbps
    if inside:
        measured = _measured_allreduce_gbps(hw)
        if measured > 0:  # the device's profile measured NCCL all-reduce bus bandwidth on its NVLink
            return measured
    link = hw.scaleup_gbps if inside else hw.scaleout_gbps
    return link * collective_efficiency(profile_for(topo))


def _measured_allreduce_gbps(hw: DeviceSpec) -> float:
    prof = profiles.profile_for(hw)
    return prof.allreduce_busbw_gbps if prof is not None else 0.0


def kv_transfer_us(topo: Topology, nbytes_per_die: float) -> float:
    """Prefill -> decode KV-cache transfer of `nbytes_per_die` over the RDMA plane (XDS §2.2)."""
    _check(nbytes=nbytes_per_die)
    if nbytes_per_die == 0:
        return 0.0
    link = topo.hardware.scaleout_gbps or topo.hardware.scaleup_gbps  # local: no RDMA plane
    return FLOOR_US + nbytes_per_die / (link * 1e3)

