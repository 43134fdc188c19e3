"""Deployment search: enumerate prefill and decode configurations, score them with the serving
model, keep the feasible ones under the SLOs, and split the topology's devices between phases.

Step 1: decode candidates (colocated EP over the instance's dies, and disaggregated MoE-attention
        with A:F ratio and DP domains) x batch per device x microbatches.
Step 2: prefill candidates: instance size x tokens per device x microbatches.
Step 3: drop memory-infeasible candidates and those over the TPOT / TTFT targets; keep the Pareto
        frontier (throughput per device vs TPOT) of decode.
Step 4: for the best decode candidate of each instance shape and the best prefill candidate,
        choose instance counts so that prefill and decode serve the same request rate
        (prompt tokens vs output tokens of the workload) with the most requests/s on the topology.
"""

from __future__ import annotations

import json

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Generic, TypeVar

from costmodels.errors import InfeasibleError, InputError
from costmodels.model_shape import ModelShape
from costmodels.serving import DecodeDeployment, Deployment, Estimate, PrefillDeployment, estimate
from costmodels.topology import Topology
from planner.ir.plan import Workload

BATCHES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)
PREFILL_TOKENS = (2048, 4096, 8192, 16384, 32768)
MICROBATCHES = (1, 2)
DP_DOMAINS = (1, 2, 3)


@dataclass(frozen=True)
class Pins:
    """Instance shapes a user fixes instead of letting the search choose them (None = search over it).

    What the service must serve (request shape, precision, SLOs) is the plan's `Workload`.
    """

    decode_mode: str | None = None  # one of costmodels.serving.DECODE_MODES
    decode_devices: int | None = None  # colocated decode instance size
    attention_devices: int | None = None  # disaggregated decode: devices running attention
    moe_devices: int | None = None  # disaggregated decode: devices holding the experts
    prefill_devices: int | None = None

    @property
    def effective_decode_mode(self) -> str | None:
        """The decode mode the pins imply: pinned attention/MoE devices mean a disaggregated instance."""
        if self.decode_mode is None and self.attention_devices:
            return "disaggregated"
        return self.decode_mode


# The deployment type of a candidate: Candidate[DecodeDeployment] for decode, [PrefillDeployment]
# for prefill; covariant (candidates are frozen) so either is a Candidate[Deployment].
D = TypeVar("D", bound=Deployment, covariant=True)


@dataclass(frozen=True)
class Candidate(Generic[D]):
    """One scored configuration of one phase."""

    phase: str
    deployment: D
    estimate: Estimate

    @property
    def instance_devices(self) -> int:
        dep = self.deployment
        if isinstance(dep, DecodeDeployment) and dep.mode == "disaggregated":
            return dep.attention_devices + dep.moe_devices
        return dep.devices

    @property
    def tput(self) -> float:
        return self.estimate.throughput_per_device

    def summary(self) -> dict:
        dep = self.deployment
        d = {"phase": self.phase, "devices": self.instance_devices, "tput_per_device": self.tput}
        if isinstance(dep, DecodeDeployment):
            d.update(mode=dep.mode, batch_per_device=dep.batch_per_device, microbatches=dep.microbatches,
                     tpot_ms=self.estimate.tpot_ms)
            if dep.mode == "disaggregated":
                d.update(attention_devices=dep.attention_devices, moe_devices=dep.moe_devices,
                         dp_domains=dep.dp_domains)
        else:
            d.update(tokens_per_device=dep.tokens_per_device, microbatches=dep.microbatches,
                     ttft_ms=self.estimate.ttft_ms)
        return d


@dataclass(frozen=True)
class SearchResult:
    decode: Candidate[DecodeDeployment]
    prefill: Candidate[PrefillDeployment]
    decode_instances: int
    prefill_instances: int
    requests_per_s: float
    frontier: tuple[Candidate[DecodeDeployment], ...]
    evaluated: int
    rejected: dict = field(default_factory=dict)


def _instance_sizes(topo: Topology, min_dies: int) -> list[int]:
    """Device counts an instance may have: whole servers (and halves/quarters below one server)."""
    per = topo.devices_per_server
    sizes = {per * k for k in range(1, topo.num_devices // per + 1)}
    sizes |= {d for d in (1, 2, 4) if d < per}
    return sorted(s for s in sizes if s * topo.dies_per_device >= min_dies and s <= topo.num_devices)


def _thin(sizes: list[int], keep: int = 16) -> list[int]:
    """At most `keep` sizes spread geometrically (a 384-device pod has 48 server multiples)."""
    if len(sizes) <= keep:
        return sizes
    picked = {sizes[round(i * (len(sizes) - 1) / (keep - 1))] for i in range(keep)}
    return sorted(picked)


def _score(shape: ModelShape, topo: Topology, dep: Deployment, tally: dict) -> Estimate | None:
    try:
        est = estimate(shape, topo, dep)
    except InputError as exc:  # a configuration the model refuses (EP too small for E, ...)
        tally["invalid"] = tally.get("invalid", 0) + 1
        tally.setdefault("example_invalid", str(exc))
        return None
    if not est.feasible:
        tally["memory"] = tally.get("memory", 0) + 1
        tally.setdefault("example_memory", est.infeasible_reason)
        return None
    return est


def decode_candidates(shape: ModelShape, topo: Topology, wl: Workload, pins: Pins,
                      tally: dict) -> list[Candidate[DecodeDeployment]]:
    """Step 1 + 3 (decode): every feasible configuration within the TPOT target."""
    E = shape.num_routed_experts
    out: list[Candidate[DecodeDeployment]] = []
    # what the workload fixes; each candidate replaces the instance shape, batch and microbatches
    common = DecodeDeployment(kv_len=wl.input_len + wl.output_len // 2, mtp_accept=wl.mtp_accept, quant=wl.quant)
    mode = pins.effective_decode_mode
    colocated = [] if mode == "disaggregated" else (
        [pins.decode_devices] if pins.decode_devices else _thin(_instance_sizes(topo, min_dies=1)))
    for devices in colocated:
        for mb in MICROBATCHES:
            for batch in BATCHES:
                dep = replace(common, mode="colocated", devices=devices, batch_per_device=batch, microbatches=mb)
                est = _score(shape, topo, dep, tally)
                if est is not None:
                    out.append(Candidate("decode", dep, est))
    # disaggregated (AFD): MoE devices hold one expert slot per die (the xDeepServe layout) or a few per die
    per = topo.devices_per_server
    moe_sizes = sorted({per * math.ceil(E / (topo.dies_per_device * per) * f) for f in (1.0, 1.125, 1.25)})
    if pins.moe_devices:
        moe_sizes = [pins.moe_devices]
    attn_sizes = [pins.attention_devices] if pins.attention_devices else _thin(_instance_sizes(topo, 1), 8)
    if mode == "colocated" or pins.decode_devices:
        moe_sizes = []
    for moe in moe_sizes:
        if moe >= topo.num_devices:
            continue
        for attn in attn_sizes:
            if attn + moe > topo.num_devices:
                continue
            for domains in DP_DOMAINS:
                for mb in MICROBATCHES:
                    for batch in BATCHES:
                        dep = replace(common, mode="disaggregated", attention_devices=attn, moe_devices=moe,
                                      dp_domains=domains, batch_per_device=batch, microbatches=mb)
                        est = _score(shape, topo, dep, tally)
                        if est is not None:
                            out.append(Candidate("decode", dep, est))
    return out


def prefill_candidates(shape: ModelShape, topo: Topology, wl: Workload, pins: Pins,
                       tally: dict) -> list[Candidate[PrefillDeployment]]:
    """Step 2 + 3 (prefill): every feasible instance within the TTFT target."""
    out: list[Candidate[PrefillDeployment]] = []
    sizes = [pins.prefill_devices] if pins.prefill_devices else _thin(_instance_sizes(topo, min_dies=1), 8)
    for devices in sizes:
        for tokens in PREFILL_TOKENS:
            if tokens < wl.input_len // max(1, topo.dies_per_device):
                continue
            for mb in MICROBATCHES:
                dep = PrefillDeployment(devices=devices, tokens_per_device=tokens, prompt_len=wl.input_len,
                                        microbatches=mb, prefix_hit=wl.prefix_hit, quant=wl.quant)
                est = _score(shape, topo, dep, tally)
                if est is not None:
                    out.append(Candidate("prefill", dep, est))
    return out


def _tpot(c: Candidate[DecodeDeployment]) -> float:
    tpot = c.estimate.tpot_ms
    assert tpot is not None, "estimate_decode always sets tpot_ms"
    return tpot


def _ttft(c: Candidate[PrefillDeployment]) -> float:
    ttft = c.estimate.ttft_ms
    assert ttft is not None, "estimate_prefill always sets ttft_ms"
    return ttft


def pareto(cands: list[Candidate[DecodeDeployment]]) -> list[Candidate[DecodeDeployment]]:
    """Decode candidates not dominated in (higher throughput per device, lower TPOT)."""
    pts = sorted(cands, key=lambda c: (_tpot(c), -c.tput))
    front: list[Candidate[DecodeDeployment]] = []
    best = -1.0
    for c in pts:
        if c.tput > best + 1e-9:
            front.append(c)
            best = c.tput
    return front


def _key(c: Candidate[Deployment]) -> tuple[float, int, str]:
    """Deterministic preference: throughput, then fewer devices, then a stable description (fields by
    name, so it does not depend on the order the dataclass declares them in)."""
    return (round(c.tput, 6), -c.instance_devices, json.dumps(asdict(c.deployment), sort_keys=True))


def split_devices(topo: Topology, dec: Candidate[DecodeDeployment], pre: Candidate[PrefillDeployment],
                  wl: Workload) -> tuple[int, int, float]:
    """Step 4: instance counts (decode, prefill) maximising served requests/s on the topology."""
    out_tokens = wl.output_len
    in_tokens = wl.input_len
    dec_rate = dec.tput * dec.instance_devices / out_tokens  # requests/s one decode instance finishes
    pre_rate = pre.tput * pre.instance_devices / in_tokens  # requests/s one prefill instance admits
    best = (0, 0, -1.0)
    for nd in range(1, topo.num_devices // dec.instance_devices + 1):
        left = topo.num_devices - nd * dec.instance_devices
        np_ = left // pre.instance_devices
        if np_ < 1:
            break
        # fewer prefill instances if they would idle: the rate is the slower phase's
        need = math.ceil(nd * dec_rate / pre_rate - 1e-9)
        np_ = max(1, min(np_, need))
        rate = min(nd * dec_rate, np_ * pre_rate)
        if rate > best[2] + 1e-9:
            best = (nd, np_, rate)
    return best


def search(shape: ModelShape, topo: Topology, wl: Workload, pins: Pins = Pins()) -> SearchResult:
    """Steps 1-4; raises InfeasibleError naming why nothing fits.

    Candidates are scored at perfect expert balance (imbalance 1.0): the balancer has not run yet;
    the compiler re-scores the chosen ones with the imbalance it reaches (`rescore`).
    """
    tally: dict = {}
    dec_all = decode_candidates(shape, topo, wl, pins, tally)
    pre_all = prefill_candidates(shape, topo, wl, pins, tally)
    evaluated = len(dec_all) + len(pre_all) + tally.get("invalid", 0) + tally.get("memory", 0)
    if not dec_all or not pre_all:
        phase = "decode" if not dec_all else "prefill"
        why = tally.get("example_memory") or tally.get("example_invalid") or "no configuration"
        raise InfeasibleError(
            f"{shape.name} on {topo.name}: no memory-feasible {phase} configuration ({why}); "
            "use a larger topology or a lower precision (--quant int8)"
        )
    dec_ok = [c for c in dec_all if wl.tpot_slo_ms is None or _tpot(c) <= wl.tpot_slo_ms]
    pre_ok = [c for c in pre_all if wl.ttft_slo_ms is None or _ttft(c) <= wl.ttft_slo_ms]
    if not dec_ok:
        best_tpot = min(_tpot(c) for c in dec_all)
        raise InfeasibleError(
            f"{shape.name} on {topo.name}: no decode configuration meets --tpot-ms {wl.tpot_slo_ms:g} "
            f"(best feasible TPOT {best_tpot:.1f} ms); relax --tpot-ms or raise --mtp-accept"
        )
    if not pre_ok:
        best_ttft = min(_ttft(c) for c in pre_all)
        raise InfeasibleError(
            f"{shape.name} on {topo.name}: no prefill configuration meets --ttft-ms {wl.ttft_slo_ms:g} "
            f"(best feasible TTFT {best_ttft:.0f} ms); relax --ttft-ms or shorten --input-len"
        )
    pre = max(pre_ok, key=_key)
    # the best decode configuration of each instance shape, then the split decides between them
    by_shape: dict[tuple[str, int, int, int], Candidate[DecodeDeployment]] = {}
    for c in dec_ok:
        dep = c.deployment
        k = (dep.mode, c.instance_devices, dep.attention_devices, dep.moe_devices)
        if k not in by_shape or _key(c) > _key(by_shape[k]):
            by_shape[k] = c
    best: tuple[tuple[float, float], Candidate[DecodeDeployment], int, int, float] | None = None
    for c in sorted(by_shape.values(), key=_key, reverse=True):
        nd, np_, rate = split_devices(topo, c, pre, wl)
        if nd == 0:
            continue
        score = (round(rate, 6), round(c.tput, 6))
        if best is None or score > best[0]:
            best = (score, c, nd, np_, rate)
    if best is None:
        raise InfeasibleError(
            f"{shape.name} on {topo.name}: no decode instance leaves room for a prefill instance "
            f"({topo.num_devices} devices); use a larger topology"
        )
    _, dec, nd, np_, rate = best
    return SearchResult(decode=dec, prefill=pre, decode_instances=nd, prefill_instances=np_, requests_per_s=rate,
                        frontier=tuple(pareto(dec_ok)), evaluated=evaluated,
                        rejected={k: v for k, v in tally.items() if not k.startswith("example")})


def rescore(c: Candidate[D], shape: ModelShape, topo: Topology, imbalance: float, redundant: int) -> Candidate[D]:
    """Re-estimate a chosen candidate with the plan's exact slot layout (`redundant` replicas) and the
    expert imbalance the balancer actually reached."""
    dep = replace(c.deployment, imbalance=max(1.0, imbalance), redundant_experts=redundant)
    return Candidate(c.phase, dep, estimate(shape, topo, dep))
