"""The KV-cache hand-off of a request from a prefill group to a decode group of a mixed topology.

`estimate_prefill` already prices the hand-off inside one topology (its `kv_transfer` term, over the
group's own RDMA plane). Between hardware groups the KV crosses the inter-group scale-out link
(`MixedTopology.link_gbps`): this module prices that crossing, per prefill batch (what TTFT waits for)
and per request (what loads the link).
"""

from __future__ import annotations

from dataclasses import dataclass

from costmodels import comm, compute, memory
from costmodels.model_shape import ModelShape
from costmodels.serving import PrefillDeployment
from costmodels.topology import Topology


@dataclass(frozen=True)
class Handoff:
    """KV bytes moved between groups and the time TTFT spends on it."""

    bytes_per_request: float  # one prompt's KV cache (all layers), what crosses per request
    bytes_per_die: float  # one prefill die's batch: the largest piece any NIC sends at once
    link_gbps_per_device: float  # inter-group bandwidth per device, one direction (the slower NIC)
    latency_us: float  # path hops between the groups plus the transfer software floor
    transfer_ms: float  # the batch's hand-off: added to TTFT

    def to_dict(self) -> dict:
        return {"bytes_per_request": round(self.bytes_per_request, 1), "bytes_per_die": round(self.bytes_per_die, 1),
                "link_gbps_per_device": self.link_gbps_per_device, "latency_us": self.latency_us,
                "transfer_ms": round(self.transfer_ms, 6)}


def kv_handoff(shape: ModelShape, prefill: Topology, dep: PrefillDeployment, link_gbps_per_device: float,
               link_latency_us: float) -> Handoff:
    """The cross-group hand-off of a prefill batch of `dep` on `prefill`'s hardware.

    Each prefill die sends the KV of the prompts it computed (its tokens, shared by its attention-TP
    group: `kv_replicas / tp` as in estimate_prefill) through its share of the device's NIC.
    The transfer adds to TTFT rather than overlapping it: serving engines with prefill-decode
    disaggregation (SGLang, vLLM) stream the first token from the decode instance, which starts only
    once the request's whole KV cache has landed.
    """
    hw = prefill.hardware
    prec = compute.precision(dep.quant, dep.kv_dtype, hw)
    tp = dep.attn_tp
    tokens = dep.tokens_per_device / hw.dies  # prompt tokens per die per batch
    per_die = memory.kv_bytes(shape, tokens * compute.kv_replicas(shape, tp) / tp, prec.kv_bytes,
                              seq_len=dep.prompt_len)
    per_request = memory.kv_bytes(shape, dep.prompt_len, prec.kv_bytes, seq_len=dep.prompt_len)
    link_per_die = link_gbps_per_device / hw.dies
    latency = comm.FLOOR_US + link_latency_us
    us = latency + per_die / (link_per_die * 1e3)
    return Handoff(per_request, per_die, link_gbps_per_device, latency, us / 1e3)
