"""DeepSeek's EPLB expert balancer, re-implemented from its description: the baseline.

Every engine (SGLang, vLLM, vllm-ascend, TensorRT-LLM) places redundant experts with
this greedy; podplan's balancer (`planner.balance.balancer`) runs it as the comparison point.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from costmodels.errors import InputError


@dataclass(frozen=True)
class EplbResult:
    """One EPLB solve: `phy2log` [L, R], `log2phy` [L, E, X] (-1 padded), `logcnt` [L, E]."""

    phy2log: np.ndarray
    log2phy: np.ndarray
    logcnt: np.ndarray


def _replicate(load: np.ndarray, slots: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Replicate: one slot per expert, each further slot to the largest load per replica.

    load: [n] tokens; returns slot2item [slots], replica rank of each slot [slots],
    count [n]. Ties go to the lowest item id (argmax returns the first maximum).
    """
    n = load.shape[0]
    slot2item = np.concatenate([np.arange(n), np.zeros(slots - n, dtype=np.int64)])
    rank = np.zeros(slots, dtype=np.int64)
    count = np.ones(n, dtype=np.int64)
    for s in range(n, slots):
        item = int(np.argmax(load / count))
        slot2item[s] = item
        rank[s] = count[item]
        count[item] += 1
    return slot2item, rank, count


def _balanced_pack(weight: np.ndarray, packs: int) -> tuple[np.ndarray, np.ndarray]:
    """BalancedPack: items by descending weight into the lightest pack with room.

    weight: [n] tokens, n divisible by `packs`; returns pack of each item [n] and its
    position inside the pack [n]. Ties: stable item order, lowest pack id.
    """
    n = weight.shape[0]
    per_pack = n // packs
    pack_of = np.zeros(n, dtype=np.int64)
    pos_of = np.zeros(n, dtype=np.int64)
    pack_load = np.zeros(packs)
    pack_size = np.zeros(packs, dtype=np.int64)
    for item in np.argsort(-weight, kind="stable"):
        # Full packs are masked with +inf so argmin picks the lightest open pack.
        open_load = np.where(pack_size < per_pack, pack_load, np.inf)
        pack = int(np.argmin(open_load))
        pack_of[item] = pack
        pos_of[item] = pack_size[pack]
        pack_load[pack] += weight[item]
        pack_size[pack] += 1
    return pack_of, pos_of


def _check(load: np.ndarray, slots: int, groups: int, nodes: int, gpus: int) -> None:
    layers_experts = load.shape
    if load.ndim != 2:
        raise InputError(f"eplb: load has shape {layers_experts}; it must be [layers, experts]")
    experts = load.shape[1]
    if gpus < 1 or nodes < 1 or groups < 1:
        raise InputError("eplb: gpus, nodes and groups must be >= 1")
    if slots < experts or slots % gpus:
        raise InputError(
            f"eplb: {slots} slots for {experts} experts on {gpus} GPUs; slots must be "
            ">= experts and divisible by the GPU count"
        )
    if gpus % nodes:
        raise InputError(f"eplb: {gpus} GPUs do not split over {nodes} nodes; use a divisor")
    if experts % groups:
        raise InputError(f"eplb: {experts} experts do not split into {groups} groups; use a divisor")


def eplb(load: np.ndarray, slots: int, groups: int, nodes: int, gpus: int) -> EplbResult:
    """Place `slots` physical expert replicas per layer on `gpus` GPUs, DeepSeek-EPLB style.

    load: [L, E] tokens per expert per step. slots: R physical slots per layer (R >= E,
    R % gpus == 0); slot s lives on GPU s // (R / gpus). groups: g expert groups of
    group-limited routing (contiguous id ranges of E/g experts). nodes: N nodes of
    gpus / N GPUs each. Hierarchical when g % N == 0, else global (g = N = 1).
    Returns phy2log [L, R] expert ids, log2phy [L, E, X] slot ids (-1 padded), logcnt [L, E].
    """
    load = np.asarray(load, dtype=np.float64)
    _check(load, slots, groups, nodes, gpus)
    if groups % nodes:
        groups, nodes = 1, 1
    layers, experts = load.shape
    group_size = experts // groups
    groups_per_node = groups // nodes
    experts_per_node = experts // nodes
    slots_per_node = slots // nodes
    gpus_per_node = gpus // nodes
    slots_per_gpu = slots // gpus

    phy2log = np.zeros((layers, slots), dtype=np.int64)
    phy_rank = np.zeros((layers, slots), dtype=np.int64)
    logcnt = np.zeros((layers, experts), dtype=np.int64)
    for layer in range(layers):
        w = load[layer]
        # Step 1: pack whole expert groups onto nodes by group load, g / N groups a node.
        group_load = w.reshape(groups, group_size).sum(axis=1)
        group_node, group_pos = _balanced_pack(group_load, nodes)
        # Node-major expert order ("mlog"): node n owns mlog ids [n*E/N, (n+1)*E/N), its
        # groups in pack order, each group's experts in id order.
        group_start = (group_node * groups_per_node + group_pos) * group_size
        log2mlog = (group_start[:, None] + np.arange(group_size)).reshape(-1)
        mlog2log = np.argsort(log2mlog)
        for node in range(nodes):
            node_experts = mlog2log[node * experts_per_node : (node + 1) * experts_per_node]
            node_load = w[node_experts]
            # Step 2: replicate the node's experts into its R / N slots.
            slot2item, rank, count = _replicate(node_load, slots_per_node)
            # Step 3: each replica carries load / count; pack replicas onto the node's GPUs.
            replica_load = (node_load / count)[slot2item]
            gpu_of, pos_of = _balanced_pack(replica_load, gpus_per_node)
            # Step 4: slot index = node offset + GPU-in-node * slots-per-GPU + position.
            where = node * slots_per_node + gpu_of * slots_per_gpu + pos_of
            phy2log[layer, where] = node_experts[slot2item]
            phy_rank[layer, where] = rank
            logcnt[layer, node_experts] = count

    width = int(logcnt.max())
    log2phy = np.full((layers, experts, width), -1, dtype=np.int64)
    for layer in range(layers):
        log2phy[layer, phy2log[layer], phy_rank[layer]] = np.arange(slots)
    return EplbResult(phy2log=phy2log, log2phy=log2phy, logcnt=logcnt)
