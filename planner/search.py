"""Deployment search: enumerate serving configurations, score them with the cost model, keep the
feasible ones under the SLOs, and lay instances out on the devices the plan may use.

Two ways to serve, compared by the objective (requests/s on the slice, i.e. output tokens/s per
device of the slice, under the TPOT / TTFT targets):

disagg: prefill and decode on separate instances (the KV cache moves between them).
  Step 1: decode candidates (colocated EP over the instance's dies, and disaggregated MoE-attention
          with A:F ratio and DP domains) x batch per device x microbatches.
  Step 2: prefill candidates: instance size x tokens per device x microbatches.
  Step 3: drop memory-infeasible candidates and those over the TPOT / TTFT targets.
  Step 4: for the best candidate of each decode shape and of each prefill size, choose instance
          counts that pack into the pods (an instance never spans pods) and serve the same request
          rate (prompt tokens vs output tokens of the workload) with the most requests/s.
agg: prefill and decode on the same colocated instances, chunked prefill mixed into each decode
  step (costmodels.aggregated); instance size x batch x microbatches, as many instances as pack.

Instance sizes are whole servers (or 1, 2, 4 devices below one server) and at most one pod: on
CloudMatrix384 a pod is the UB domain (an all-to-all across pods would run over RDMA, ~8x slower);
on GPU clusters the whole cluster is one pod and the cost model prices the InfiniBand crossing.
`planner/placement.py` counts what a slice of the topology holds, by its placement rule.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from collections.abc import Sequence
from typing import Generic, TypeVar, Union

from costmodels.aggregated import AggregatedDeployment, estimate_aggregated
from costmodels.errors import InfeasibleError, InputError
from costmodels.hardware import dtype_bytes
from costmodels.model_shape import ModelShape
from costmodels.serving import DecodeDeployment, Estimate, PrefillDeployment, estimate
from costmodels.topology import Topology
from planner.ir.plan import Workload
from planner.placement import Slice, max_second, pack, packed_count, topology_slice

BATCHES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)
PREFILL_TOKENS = (2048, 4096, 8192, 16384, 32768)
MICROBATCHES = (1, 2)
DP_DOMAINS = (1, 2, 3)
ATTN_TP = (1, 2, 4, 8)  # attention head-TP degrees tried (dies; kept inside one server)
MODES = ("agg", "disagg")  # `--mode auto` compares both
SEARCH_MODES = ("auto", *MODES)
# Instance counts tried around the balance point of prefill and decode (the packing into pods makes
# the optimum a little ragged; further out the slower phase only idles more).
SPLIT_WINDOW = 48

AnyDeployment = Union[DecodeDeployment, PrefillDeployment, AggregatedDeployment]


@dataclass(frozen=True)
class Pins:
    """Instance shapes a user fixes instead of letting the search choose them (None = search over it).

    What the service must serve (request shape, precision, SLOs) is the plan's `Workload`.
    """

    decode_mode: str | None = None  # one of costmodels.serving.DECODE_MODES
    decode_devices: int | None = None  # colocated decode (or aggregated) instance size
    attention_devices: int | None = None  # disaggregated decode: devices running attention
    moe_devices: int | None = None  # disaggregated decode: devices holding the experts
    prefill_devices: int | None = None
    attention_tp: int | None = None  # attention head-TP degree (dies) of every instance

    @property
    def effective_decode_mode(self) -> str | None:
        """The decode mode the pins imply: pinned attention/MoE devices mean a disaggregated instance."""
        if self.decode_mode is None and self.attention_devices:
            return "disaggregated"
        return self.decode_mode

    @property
    def implies_disagg(self) -> str | None:
        """The flag that only makes sense with separate prefill instances, or None."""
        if self.prefill_devices:
            return "--prefill-devices"
        if self.attention_devices or self.moe_devices:
            return "--attention-devices/--moe-devices"
        if self.decode_mode == "disaggregated":
            return "--decode-mode disaggregated"
        return None


@dataclass(frozen=True)
class Imbalance:
    """Expert load max/mean each candidate is scored at, by phase ("decode" also for aggregated
    instances) and the number of devices holding its experts (what the balancer's result depends on).

    The first search assumes perfect balance (1.0 everywhere). When the balanced plan misses a latency
    target the compiler searches again, having learnt what the balancer reached for the chosen shapes
    (`balanced`); shapes not balanced yet are scored at the worst value learnt so far (`decode`,
    `prefill`), so that an unknown shape does not win on an optimism the known ones lost.
    """

    decode: float = 1.0
    prefill: float = 1.0
    balanced: tuple[tuple[str, int, float], ...] = ()  # (phase, expert devices, max/mean reached), sorted

    def of(self, phase: str, expert_devices: int) -> float:
        for p, n, value in self.balanced:
            if p == phase and n == expert_devices:
                return value
        return self.prefill if phase == "prefill" else self.decode

    def learn(self, phase: str, expert_devices: int, value: float) -> Imbalance:
        """With what the balancer reached for one shape; the default for unknown shapes only grows."""
        rest = tuple(b for b in self.balanced if b[:2] != (phase, expert_devices))
        default = max(getattr(self, phase), value)
        return replace(self, **{phase: default}, balanced=tuple(sorted((*rest, (phase, expert_devices, value)))))

    def describe(self) -> str:
        """'decode 1.131 (168 devices 1.131), prefill 1.000': what a re-search's record says."""
        parts = []
        for phase in ("decode", "prefill"):
            known = [f"{n} devices {v:.3f}" for p, n, v in self.balanced if p == phase]
            if round(getattr(self, phase), 3) > 1.0 or known:
                parts.append(f"{phase} {getattr(self, phase):.3f}" + (f" ({', '.join(known)})" if known else ""))
        return ", ".join(parts)


# The deployment type of a candidate: Candidate[DecodeDeployment] for decode, [PrefillDeployment]
# for prefill, [AggregatedDeployment] for both on one instance; covariant (candidates are frozen).
D = TypeVar("D", bound=AnyDeployment, covariant=True)


@dataclass(frozen=True)
class Candidate(Generic[D]):
    """One scored configuration of one phase ("aggregated": both phases on one instance)."""

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
    def expert_devices(self) -> int:
        """Devices holding the instance's experts: what its balance (`Imbalance`) depends on."""
        dep = self.deployment
        if isinstance(dep, DecodeDeployment) and dep.mode == "disaggregated":
            return dep.moe_devices
        return dep.devices

    @property
    def tput(self) -> float:
        return self.estimate.throughput_per_device

    def summary(self) -> dict:
        dep = self.deployment
        d: dict = {"phase": self.phase, "devices": self.instance_devices, "tput_per_device": self.tput,
                   "attn_tp": dep.attn_tp}
        if isinstance(dep, AggregatedDeployment):
            d.update(mode="aggregated", batch_per_device=dep.batch_per_device, microbatches=dep.microbatches,
                     chunk_tokens_per_device=dep.chunk_tokens_per_device, tpot_ms=self.estimate.tpot_ms,
                     ttft_ms=self.estimate.ttft_ms)
        elif isinstance(dep, DecodeDeployment):
            d.update(mode=dep.mode, batch_per_device=dep.batch_per_device, microbatches=dep.microbatches,
                     tpot_ms=self.estimate.tpot_ms)
            if dep.mode == "disaggregated":
                d.update(attention_devices=dep.attention_devices, moe_devices=dep.moe_devices,
                         dp_domains=dep.dp_domains)
        else:
            d.update(tokens_per_device=dep.tokens_per_device, microbatches=dep.microbatches,
                     ttft_ms=self.estimate.ttft_ms)
        return d


def config_line(c: Candidate[AnyDeployment]) -> str:
    """One line naming a candidate's configuration (plan frontier points and the summary table)."""
    line = _config_line(c)
    tp = c.deployment.attn_tp
    return line + (f", attention TP{tp}" if tp > 1 else "")


def _config_line(c: Candidate[AnyDeployment]) -> str:
    s = c.summary()
    if s["phase"] == "prefill":
        return f"prefill {s['devices']} dev, {s['tokens_per_device']} tok/dev, mb {s['microbatches']}"
    if s["mode"] == "aggregated":
        return (f"aggregated {s['devices']} dev, batch {s['batch_per_device']:g}, "
                f"chunk {s['chunk_tokens_per_device']:.0f} tok/dev, mb {s['microbatches']}")
    if s["mode"] == "disaggregated":
        return (f"disaggregated {s['attention_devices']}A+{s['moe_devices']}F, {s['dp_domains']} domains, "
                f"batch {s['batch_per_device']:g}, mb {s['microbatches']}")
    return f"colocated {s['devices']} dev, batch {s['batch_per_device']:g}, mb {s['microbatches']}"


# --- candidates ----------------------------------------------------------------------------------


def _instance_sizes(topo: Topology, sl: Slice) -> list[int]:
    """Device counts an instance may have: whole servers (and 1, 2, 4 below one server), within one pod."""
    per = topo.devices_per_server
    sizes = {per * k for k in range(1, sl.largest_pod // per + 1)}
    sizes |= {d for d in (1, 2, 4) if d < per and d <= sl.largest_pod}
    return sorted(sizes)


def _thin(sizes: list[int], keep: int = 16) -> list[int]:
    """At most `keep` sizes spread geometrically (a 384-device pod has 48 server multiples)."""
    if len(sizes) <= keep:
        return sizes
    picked = {sizes[round(i * (len(sizes) - 1) / (keep - 1))] for i in range(keep)}
    return sorted(picked)


def _attn_tps(topo: Topology, devices: int, pins: Pins, domains: int = 1) -> list[int]:
    """Attention TP degrees for `devices` attention devices split into `domains` DP domains: dividing a
    domain's dies, inside one server (the all-reduce runs on the server's scale-up links). Only 1 on CPU
    processes: podplan's runtime runs attention DP only."""
    total = devices * topo.dies_per_device
    if total % domains:
        return []
    dies = total // domains
    if pins.attention_tp:
        return [pins.attention_tp] if dies % pins.attention_tp == 0 else []
    if topo.hardware.platform == "cpu":
        return [1]
    return [tp for tp in ATTN_TP if dies % tp == 0 and tp <= topo.devices_per_server * topo.dies_per_device]


@dataclass
class Tally:
    """What the search rejected, and one example reason of each kind (the largest instance's)."""

    invalid: int = 0
    memory: int = 0
    example_invalid: str = ""
    example_memory: str = ""
    example_memory_devices: int = 0

    def as_dict(self) -> dict:
        return {"invalid": self.invalid, "memory": self.memory}


def _score(shape: ModelShape, topo: Topology, dep: AnyDeployment, devices: int, tally: Tally) -> Estimate | None:
    try:
        est = estimate_aggregated(shape, topo, dep) if isinstance(dep, AggregatedDeployment) else \
            estimate(shape, topo, dep)
    except InputError as exc:  # a configuration the model refuses (EP too small for E, ...)
        tally.invalid += 1
        tally.example_invalid = tally.example_invalid or str(exc)
        return None
    if not est.feasible:
        tally.memory += 1
        if devices > tally.example_memory_devices:  # the largest instance says most about what is missing
            tally.example_memory, tally.example_memory_devices = est.infeasible_reason, devices
        return None
    return est


def _decode_common(wl: Workload) -> DecodeDeployment:
    """What the workload fixes; each candidate replaces the instance shape, batch, microbatches and the
    expert imbalance it is scored at."""
    return DecodeDeployment(kv_len=wl.input_len + wl.output_len // 2, mtp_accept=wl.mtp_accept, quant=wl.quant)


def decode_candidates(shape: ModelShape, topo: Topology, wl: Workload, pins: Pins, tally: Tally,
                      sl: Slice | None = None, imb: Imbalance = Imbalance()) -> list[Candidate[DecodeDeployment]]:
    """Step 1 + 3 (decode): every memory-feasible configuration."""
    sl = sl or topology_slice(topo)
    E = shape.num_routed_experts
    out: list[Candidate[DecodeDeployment]] = []
    common = _decode_common(wl)
    mode = pins.effective_decode_mode
    colocated = [] if mode == "disaggregated" else (
        [pins.decode_devices] if pins.decode_devices else _thin(_instance_sizes(topo, sl)))
    for devices in colocated:
        for tp in _attn_tps(topo, devices, pins):
            for mb in MICROBATCHES:
                for batch in BATCHES:
                    dep = replace(common, mode="colocated", devices=devices, batch_per_device=batch, microbatches=mb,
                                  attn_tp=tp, imbalance=imb.of("decode", devices))
                    est = _score(shape, topo, dep, devices, tally)
                    if est is not None:
                        out.append(Candidate("decode", dep, est))
    # disaggregated (AFD): MoE devices hold one expert slot per die (the xDeepServe layout) or a few per die
    per = topo.devices_per_server
    moe_sizes = sorted({per * math.ceil(E / (topo.dies_per_device * per) * f) for f in (1.0, 1.125, 1.25)}) if E else []
    if pins.moe_devices:
        moe_sizes = [pins.moe_devices]
    attn_sizes = [pins.attention_devices] if pins.attention_devices else _thin(_instance_sizes(topo, sl), 8)
    if mode == "colocated" or pins.decode_devices:
        moe_sizes = []
    for moe in moe_sizes:
        for attn in attn_sizes:
            if not sl.fits(attn + moe) or attn + moe >= sl.devices:
                continue
            for domains in DP_DOMAINS:
                # head-TP groups sit inside one DP domain of the attention devices (the cost model's rule)
                for tp in _attn_tps(topo, attn, pins, domains):
                    for mb in MICROBATCHES:
                        for batch in BATCHES:
                            dep = replace(common, mode="disaggregated", attention_devices=attn, moe_devices=moe,
                                          dp_domains=domains, batch_per_device=batch, microbatches=mb, attn_tp=tp,
                                          imbalance=imb.of("decode", moe))
                            est = _score(shape, topo, dep, attn + moe, tally)
                            if est is not None:
                                out.append(Candidate("decode", dep, est))
    return out


def prefill_candidates(shape: ModelShape, topo: Topology, wl: Workload, pins: Pins, tally: Tally,
                       sl: Slice | None = None, imb: Imbalance = Imbalance()) -> list[Candidate[PrefillDeployment]]:
    """Step 2 + 3 (prefill): every memory-feasible instance."""
    sl = sl or topology_slice(topo)
    out: list[Candidate[PrefillDeployment]] = []
    sizes = [pins.prefill_devices] if pins.prefill_devices else _thin(_instance_sizes(topo, sl), 8)
    for devices in sizes:
        for tp in _attn_tps(topo, devices, pins):
            for tokens in PREFILL_TOKENS:
                if tokens < wl.input_len // max(1, topo.dies_per_device):
                    continue
                for mb in MICROBATCHES:
                    dep = PrefillDeployment(devices=devices, tokens_per_device=tokens, prompt_len=wl.input_len,
                                            microbatches=mb, prefix_hit=wl.prefix_hit, quant=wl.quant, attn_tp=tp,
                                            imbalance=imb.of("prefill", devices))
                    est = _score(shape, topo, dep, devices, tally)
                    if est is not None:
                        out.append(Candidate("prefill", dep, est))
    return out


def aggregated_candidates(shape: ModelShape, topo: Topology, wl: Workload, pins: Pins, tally: Tally,
                          sl: Slice | None = None, imb: Imbalance = Imbalance()) -> list[Candidate[AggregatedDeployment]]:
    """Colocated instances serving both phases, chunked prefill in every decode step."""
    sl = sl or topology_slice(topo)
    out: list[Candidate[AggregatedDeployment]] = []
    common = _decode_common(wl)
    sizes = [pins.decode_devices] if pins.decode_devices else _thin(_instance_sizes(topo, sl))
    for devices in sizes:
        for tp in _attn_tps(topo, devices, pins):
            for mb in MICROBATCHES:
                for batch in BATCHES:
                    dec = replace(common, mode="colocated", devices=devices, batch_per_device=batch, microbatches=mb,
                                  attn_tp=tp, imbalance=imb.of("decode", devices))
                    dep = AggregatedDeployment(dec, input_len=wl.input_len, output_len=wl.output_len,
                                               prefix_hit=wl.prefix_hit)
                    est = _score(shape, topo, dep, devices, tally)
                    if est is not None:
                        out.append(Candidate("aggregated", dep, est))
    return out


def _tpot(c: Candidate[AnyDeployment]) -> float:
    tpot = c.estimate.tpot_ms
    assert tpot is not None, "decode and aggregated estimates always set tpot_ms"
    return tpot


def _ttft(c: Candidate[AnyDeployment]) -> float:
    ttft = c.estimate.ttft_ms
    assert ttft is not None, "prefill and aggregated estimates always set ttft_ms"
    return ttft


C = TypeVar("C", bound=Candidate)


def pareto(cands: Sequence[C]) -> list[C]:
    """Decode (or aggregated) candidates not dominated in (higher throughput per device, lower TPOT)."""
    pts = sorted(cands, key=lambda c: (_tpot(c), -c.tput, _key(c)[2:]))
    front: list[C] = []
    best = -1.0
    for c in pts:
        if c.tput > best + 1e-9:
            front.append(c)
            best = c.tput
    return front


def _key(c: Candidate[AnyDeployment]) -> tuple[float, int, int, str]:
    """Deterministic preference: throughput, then fewer devices, then less attention TP (no all-reduce
    for nothing), then a stable description (fields by name, so it does not depend on the order the
    dataclass declares them in)."""
    return (round(c.tput, 6), -c.instance_devices, -c.deployment.attn_tp,
            json.dumps(asdict(c.deployment), sort_keys=True))


# --- choosing instance counts --------------------------------------------------------------------


def split_devices(sl: Slice, dec: Candidate[DecodeDeployment], pre: Candidate[PrefillDeployment],
                  wl: Workload) -> tuple[int, int, float]:
    """Step 4: instance counts (decode, prefill) maximising served requests/s on the slice."""
    dec_rate = dec.tput * dec.instance_devices / wl.output_len  # requests/s one decode instance finishes
    pre_rate = pre.tput * pre.instance_devices / wl.input_len  # requests/s one prefill instance admits
    a, b = dec.instance_devices, pre.instance_devices
    cap = packed_count(sl, a)
    # balance point: nd x dec_rate = np x pre_rate on all the devices
    balance = sl.devices / (sl.span(a) + sl.span(b) * dec_rate / pre_rate)
    centre = min(cap, int(balance))  # packing into pods can hold fewer than the balance point
    lo, hi = max(1, centre - SPLIT_WINDOW), min(cap, centre + SPLIT_WINDOW)
    best = (0, 0, -1.0)
    for nd in range(lo, hi + 1):
        np_max = max_second(sl, a, nd, b)
        if np_max < 1:
            continue
        need = math.ceil(nd * dec_rate / pre_rate - 1e-9)  # fewer prefill instances if they would idle
        np_ = max(1, min(np_max, need))
        rate = min(nd * dec_rate, np_ * pre_rate)
        if rate > best[2] + 1e-9:
            best = (nd, np_, rate)
    return best


# --- results -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModeResult:
    """The best plan of one serving mode, or why it has none."""

    mode: str  # "agg" | "disagg"
    requests_per_s: float = 0.0
    devices_used: int = 0
    decode: Candidate[DecodeDeployment] | Candidate[AggregatedDeployment] | None = None
    prefill: Candidate[PrefillDeployment] | None = None
    decode_instances: int = 0
    prefill_instances: int = 0
    frontier: tuple[Candidate[AnyDeployment], ...] = ()  # decode (or aggregated) Pareto frontier
    prefill_frontier: tuple[Candidate[PrefillDeployment], ...] = ()  # the best prefill of each size
    error: str = ""  # why this mode has no plan

    @property
    def ok(self) -> bool:
        return not self.error

    def output_tokens_per_s(self, wl: Workload) -> float:
        return self.requests_per_s * wl.output_len

    def summary(self, wl: Workload, slice_devices: int) -> dict:
        """JSON-ready: what `compile --json` prints per mode."""
        if not self.ok:
            return {"mode": self.mode, "error": self.error}
        assert self.decode is not None
        d: dict = {
            "mode": self.mode, "requests_per_s": round(self.requests_per_s, 4), "devices_used": self.devices_used,
            "output_tokens_per_s_per_device": round(self.output_tokens_per_s(wl) / slice_devices, 4),
            "tpot_ms": _round(self.decode.estimate.tpot_ms),
            "ttft_ms": _round(self.prefill.estimate.ttft_ms if self.prefill else self.decode.estimate.ttft_ms),
            "decode": dict(_rounded(self.decode.summary()), instances=self.decode_instances,
                           config=config_line(self.decode)),
        }
        if self.prefill is not None:
            d["prefill"] = dict(_rounded(self.prefill.summary()), instances=self.prefill_instances,
                                config=config_line(self.prefill))
        return d


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _rounded(d: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}


@dataclass(frozen=True)
class SearchResult:
    """The chosen mode's plan, the other mode's best (or why it has none), and the slice's use."""

    mode: str  # the chosen mode: "agg" | "disagg"
    decode: Candidate[DecodeDeployment] | Candidate[AggregatedDeployment]
    prefill: Candidate[PrefillDeployment] | None  # None when aggregated
    decode_instances: int
    prefill_instances: int
    requests_per_s: float
    frontier: tuple[Candidate[AnyDeployment], ...]
    evaluated: int
    slice: Slice
    modes: tuple[ModeResult, ...] = ()  # every mode searched, chosen first
    why: str = ""  # why the chosen mode won
    notes: tuple[str, ...] = ()  # idle devices and other things the user should know
    rejected: dict = field(default_factory=dict)

    @property
    def devices_used(self) -> int:
        used = self.decode_instances * self.slice.span(self.decode.instance_devices)
        if self.prefill is not None:
            used += self.prefill_instances * self.slice.span(self.prefill.instance_devices)
        return used


def _check_pins(topo: Topology, sl: Slice, pins: Pins, mode: str) -> None:
    """Pins that cannot fit name the number that is wrong and the limit."""
    where = f"{topo.name}" + (f" --devices {sl.devices}" if sl.devices < topo.num_devices else "")
    for flag, value in (("--decode-devices", pins.decode_devices), ("--prefill-devices", pins.prefill_devices),
                        ("--attention-devices", pins.attention_devices), ("--moe-devices", pins.moe_devices)):
        if value is None:
            continue
        if value > sl.devices:
            raise InputError(f"{flag} {value}: {where} has {sl.devices} devices; use {sl.devices} or fewer")
        if value > sl.largest_pod:
            raise InputError(f"{flag} {value}: an instance must fit in one pod of {where} ({sl.largest_pod} devices; "
                             f"an all-to-all across pods runs over RDMA); use {sl.largest_pod} or fewer")
        if not sl.fits(value):
            raise InputError(f"{flag} {value}: an instance takes whole servers of {sl.per_server} devices, "
                             f"{sl.span(value)} here, more than the {sl.largest_pod} of {where}; use a multiple of "
                             f"{sl.per_server} up to {sl.largest_pod // sl.per_server * sl.per_server}")
    if pins.attention_tp is not None and pins.attention_tp not in ATTN_TP:
        raise InputError(f"--attention-tp {pins.attention_tp}: use one of {', '.join(map(str, ATTN_TP))}")
    if pins.attention_devices and pins.moe_devices:
        total = pins.attention_devices + pins.moe_devices
        if not sl.fits(total):
            raise InputError(f"--attention-devices {pins.attention_devices} + --moe-devices {pins.moe_devices} = "
                             f"{total}: a decode instance must fit in {sl.largest_pod} devices of {where}; "
                             "lower one of them")
    if mode == "agg" and pins.implies_disagg:
        raise InputError(f"{pins.implies_disagg} describes disaggregated serving; drop it or use --mode disagg")
    if mode != "agg":
        dec = pins.decode_devices or ((pins.attention_devices or 0) + (pins.moe_devices or 0))
        if dec and pins.prefill_devices and max_second(sl, dec, 1, pins.prefill_devices) < 1:
            flag = "--decode-devices" if pins.decode_devices else "--attention-devices + --moe-devices"
            raise InputError(f"{flag} {dec} + --prefill-devices {pins.prefill_devices}: {where} has {sl.devices} "
                             f"devices{' in pods of ' + str(sl.largest_pod) if len(sl.pods) > 1 else ''}, not room "
                             "for one instance of each; lower one, or use --mode agg")


def _no_memory(shape: ModelShape, topo: Topology, wl: Workload, sl: Slice, phase: str, tally: Tally) -> str:
    """Why no instance fits in memory, with the number that is short: the model's weights at the
    workload's precision against the HBM of the largest instance the slice allows."""
    why = tally.example_memory or tally.example_invalid or "no configuration"
    at = f" at {tally.example_memory_devices} devices" if tally.example_memory else ""
    weights_gb = shape.params_total * dtype_bytes(wl.quant) / 1e9
    hbm = topo.hardware.chip_hbm_gb
    need = math.ceil(weights_gb / hbm)
    knob = ("a lower precision (--quant int8)" if wl.quant not in ("int8", "fp8") else "a larger topology")
    if need > sl.largest_pod:  # the weights alone: the per-die detail would only repeat it
        return (f"no memory-feasible {phase} configuration: its {wl.quant} weights alone need {weights_gb:,.0f} GB "
                f"= {need} x {hbm:g} GB devices, and an instance may span {sl.largest_pod} "
                f"({'one pod' if len(sl.pods) > 1 else 'the slice'}); use {knob}")
    return f"no memory-feasible {phase} configuration{at} (the largest instance here): {why}"


def _search_disagg(shape: ModelShape, topo: Topology, wl: Workload, pins: Pins, sl: Slice,
                   counter: list[int], imb: Imbalance) -> ModeResult:
    dec_tally, pre_tally = Tally(), Tally()
    dec_all = decode_candidates(shape, topo, wl, pins, dec_tally, sl, imb)
    pre_all = prefill_candidates(shape, topo, wl, pins, pre_tally, sl, imb)
    counter[0] += len(dec_all) + len(pre_all) + sum(t.invalid + t.memory for t in (dec_tally, pre_tally))
    if not dec_all:
        return ModeResult("disagg", error=_no_memory(shape, topo, wl, sl, "decode", dec_tally))
    if not pre_all:
        return ModeResult("disagg", error=_no_memory(shape, topo, wl, sl, "prefill", pre_tally))
    dec_ok = [c for c in dec_all if wl.tpot_slo_ms is None or _tpot(c) <= wl.tpot_slo_ms]
    pre_ok = [c for c in pre_all if wl.ttft_slo_ms is None or _ttft(c) <= wl.ttft_slo_ms]
    if not dec_ok:
        best_tpot = min(dec_all, key=lambda c: (_tpot(c), _key(c)))
        return ModeResult("disagg", error=(
            f"no decode configuration meets --tpot-ms {wl.tpot_slo_ms:g} (best reachable TPOT {_tpot(best_tpot):.1f} ms "
            f"with {config_line(best_tpot)}); relax --tpot-ms to {math.ceil(_tpot(best_tpot))} or raise --mtp-accept"))
    if not pre_ok:
        best_ttft = min(pre_all, key=lambda c: (_ttft(c), _key(c)))
        return ModeResult("disagg", error=(
            f"no prefill configuration meets --ttft-ms {wl.ttft_slo_ms:g} (best reachable TTFT {_ttft(best_ttft):.0f} ms "
            f"with {config_line(best_ttft)}); relax --ttft-ms to {math.ceil(_ttft(best_ttft))} or shorten --input-len"))
    # the best configuration of each decode shape and each prefill size; the split decides between them
    by_shape = best_per_shape(dec_ok)
    by_size: dict[int, Candidate[PrefillDeployment]] = {}
    for p in pre_ok:
        if p.instance_devices not in by_size or _key(p) > _key(by_size[p.instance_devices]):
            by_size[p.instance_devices] = p
    best: tuple[tuple[float, int, float, float], Candidate[DecodeDeployment], Candidate[PrefillDeployment],
                int, int, float] | None = None
    for pre in sorted(by_size.values(), key=_key, reverse=True):
        for c in sorted(by_shape.values(), key=_key, reverse=True):
            nd, np_, rate = split_devices(sl, c, pre, wl)
            if nd == 0:
                continue
            used = nd * sl.span(c.instance_devices) + np_ * sl.span(pre.instance_devices)
            score = (round(rate, 6), -used, round(c.tput, 6), round(pre.tput, 6))
            if best is None or score > best[0]:
                best = (score, c, pre, nd, np_, rate)
    if best is None:
        smallest = min(by_shape.values(), key=lambda c: c.instance_devices)
        smallest_pre = min(by_size.values(), key=lambda c: c.instance_devices)
        dec_n, pre_n = smallest.instance_devices, smallest_pre.instance_devices
        # an instance takes whole servers: say so when that, not the count, is what does not fit
        dec_span = f" (on whole servers: {sl.span(dec_n)})" if sl.span(dec_n) != dec_n else ""
        pre_span = f" (on whole servers: {sl.span(pre_n)})" if sl.span(pre_n) != pre_n else ""
        return ModeResult("disagg", error=(
            f"no decode instance leaves room for a prefill instance (smallest feasible: decode {dec_n}{dec_span} "
            f"+ prefill {pre_n}{pre_span} devices, {sl.devices} available); use --mode agg or a larger topology"))
    _, dec, pre, nd, np_, rate = best
    used = nd * sl.span(dec.instance_devices) + np_ * sl.span(pre.instance_devices)
    return ModeResult("disagg", rate, used, dec, pre, nd, np_, tuple(pareto(dec_ok)),
                      tuple(sorted(by_size.values(), key=lambda c: c.instance_devices)))


def _search_agg(shape: ModelShape, topo: Topology, wl: Workload, pins: Pins, sl: Slice,
                counter: list[int], imb: Imbalance) -> ModeResult:
    tally = Tally()
    if pins.effective_decode_mode == "disaggregated":
        return ModeResult("agg", error="aggregated serving runs colocated instances (--decode-mode disaggregated)")
    cands = aggregated_candidates(shape, topo, wl, pins, tally, sl, imb)
    counter[0] += len(cands) + tally.invalid + tally.memory
    if not cands:
        return ModeResult("agg", error=_no_memory(shape, topo, wl, sl, "aggregated", tally))
    ok = [c for c in cands if (wl.tpot_slo_ms is None or _tpot(c) <= wl.tpot_slo_ms)
          and (wl.ttft_slo_ms is None or _ttft(c) <= wl.ttft_slo_ms)]
    if not ok:
        if wl.tpot_slo_ms is not None and all(_tpot(c) > wl.tpot_slo_ms for c in cands):
            b = min(cands, key=lambda c: (_tpot(c), _key(c)))
            return ModeResult("agg", error=(
                f"no aggregated configuration meets --tpot-ms {wl.tpot_slo_ms:g} (best reachable TPOT "
                f"{_tpot(b):.1f} ms with {config_line(b)}); relax --tpot-ms to {math.ceil(_tpot(b))} or use --mode disagg"))
        within = [c for c in cands if wl.tpot_slo_ms is None or _tpot(c) <= wl.tpot_slo_ms]
        b = min(within, key=lambda c: (_ttft(c), _key(c)))
        return ModeResult("agg", error=(
            f"no aggregated configuration meets --ttft-ms {wl.ttft_slo_ms:g} within the TPOT target (best reachable "
            f"TTFT {_ttft(b):.0f} ms with {config_line(b)}); relax --ttft-ms to {math.ceil(_ttft(b))} or use --mode disagg"))
    best: tuple[tuple[float, int, float], Candidate[AggregatedDeployment], int, float] | None = None
    for c in ok:
        n = packed_count(sl, c.instance_devices)
        if n < 1:
            continue
        rate = n * c.tput * c.instance_devices / wl.output_len
        score = (round(rate, 6), -n * sl.span(c.instance_devices), round(c.tput, 6))
        if best is None or score > best[0] or (score == best[0] and _key(c) > _key(best[1])):
            best = (score, c, n, rate)
    assert best is not None, "every candidate size fits the slice (sizes come from it)"
    _, c, n, rate = best
    return ModeResult("agg", rate, n * sl.span(c.instance_devices), c, None, n, 0, tuple(pareto(ok)))


def _why(win: ModeResult, other: ModeResult | None, wl: Workload) -> str:
    if other is None:
        return f"--mode {win.mode}: the only mode searched"
    if not other.ok:
        return f"{other.mode} has no plan under these targets and devices (see its row)"
    gain = (win.requests_per_s / other.requests_per_s - 1.0) * 100 if other.requests_per_s > 0 else math.inf
    if gain > 1e-6:
        return (f"{win.mode} serves {win.requests_per_s:,.2f} req/s vs {other.mode} {other.requests_per_s:,.2f} "
                f"(+{gain:.1f}%) under the same targets")
    return (f"{win.mode} and {other.mode} tie at {win.requests_per_s:,.2f} req/s; {win.mode} uses "
            f"{win.devices_used} devices vs {other.devices_used}")


def _idle_notes(res: ModeResult, sl: Slice, wl: Workload) -> tuple[str, ...]:
    """Why devices of the slice are left idle, in the user's terms."""
    assert res.decode is not None
    idle = sl.devices - res.devices_used
    if idle <= 0:
        return ()
    if res.prefill is None:
        return (f"{idle} idle: no instance of {res.decode.instance_devices} devices fits the remainder "
                f"(instances stay within one pod and on whole servers)",)
    more_dec = max_second(sl, res.prefill.instance_devices, res.prefill_instances,
                          res.decode.instance_devices) > res.decode_instances
    more_pre = max_second(sl, res.decode.instance_devices, res.decode_instances,
                          res.prefill.instance_devices) > res.prefill_instances
    if not more_dec and not more_pre:
        return (f"{idle} idle: no instance size chosen ({res.decode.instance_devices} decode, "
                f"{res.prefill.instance_devices} prefill devices) fits the remainder",)
    dec_rate = res.decode.tput * res.decode.instance_devices / wl.output_len
    pre_rate = res.prefill.tput * res.prefill.instance_devices / wl.input_len
    slower = "prefill" if res.prefill_instances * pre_rate < res.decode_instances * dec_rate else "decode"
    return (f"{idle} idle: {'a further prefill' if more_pre else 'a further decode'} instance would only wait on "
            f"{slower} (prefill {res.prefill_instances * pre_rate:,.2f} req/s vs decode "
            f"{res.decode_instances * dec_rate:,.2f} req/s), and no instance of the other phase fits the remainder",)


def _replica_notes(shape: ModelShape, topo: Topology, res: ModeResult, sl: Slice, wl: Workload) -> tuple[str, ...]:
    """A model whose weights fit on one device cannot use a pod as one instance (its experts run out
    long before the devices do): the plan serves it with many independent replicas. Say so, so that
    "384 instances" reads as intended."""
    assert res.decode is not None
    weights_gb = shape.params_total * dtype_bytes(wl.quant) / 1e9
    if weights_gb >= topo.hardware.chip_hbm_gb or max(res.decode_instances, res.prefill_instances) <= 1:
        return ()
    kind = "aggregated" if res.prefill is None else "decode"
    parts = [f"{_count(res.decode_instances, kind + ' instance')} of {_count(res.decode.instance_devices, 'device')}"]
    if res.prefill is not None:
        parts.insert(0, f"{_count(res.prefill_instances, 'prefill instance')} of "
                        f"{_count(res.prefill.instance_devices, 'device')}")
    size = f"{weights_gb:,.3g} GB" if weights_gb >= 1 else f"{weights_gb * 1e3:.3g} MB"
    return (f"{shape.name} is small ({size} of {wl.quant} weights fit on one device): the plan "
            f"replicates it as {' + '.join(parts)}, using {res.devices_used} of {sl.devices} devices",)


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def search(shape: ModelShape, topo: Topology, wl: Workload, pins: Pins = Pins(), mode: str = "disagg",
           devices: int | None = None, imbalance: Imbalance = Imbalance()) -> SearchResult:
    """Search the modes `mode` names ("auto": both) on the first `devices` devices (None: all) and return
    the best plan; raises InfeasibleError naming why nothing fits and the knob that would.

    Candidates are scored at `imbalance` (default: perfect expert balance; the balancer has not run yet);
    the compiler re-scores the chosen ones with the imbalance it reaches (`rescore`), and searches again
    at that imbalance when the re-scored plan misses a latency target.
    """
    if mode not in SEARCH_MODES:
        raise InputError(f"--mode {mode}: use one of {', '.join(SEARCH_MODES)}")
    sl = topology_slice(topo, devices)
    _check_pins(topo, sl, pins, mode)
    if mode == "auto" and pins.implies_disagg:
        mode = "disagg"  # a pin of a disaggregated shape: the other mode cannot honour it
    counter = [0]
    results = []
    for m in (MODES if mode == "auto" else (mode,)):
        results.append(_search_agg(shape, topo, wl, pins, sl, counter, imbalance) if m == "agg"
                       else _search_disagg(shape, topo, wl, pins, sl, counter, imbalance))
    ok = [r for r in results if r.ok]
    if not ok:
        memory = [r for r in results if r.error.startswith("no memory-feasible")]
        if len(memory) == len(results):  # the same shortage in every mode: say it once
            why = memory[-1].error
        else:
            why = "; ".join(f"{r.mode}: {r.error}" if len(results) > 1 else r.error for r in results)
        raise InfeasibleError(f"{shape.name} on {topo.name}: {why}")
    # the objective: requests/s on the slice; then fewer devices; then disagg (the engines' default at scale)
    win = max(ok, key=lambda r: (round(r.requests_per_s, 6), -r.devices_used, r.mode == "disagg"))
    others = [r for r in results if r is not win]
    assert win.decode is not None
    frontier = tuple(win.frontier) + tuple(win.prefill_frontier)
    return SearchResult(
        mode=win.mode, decode=win.decode, prefill=win.prefill, decode_instances=win.decode_instances,
        prefill_instances=win.prefill_instances, requests_per_s=win.requests_per_s, frontier=frontier,
        evaluated=counter[0], slice=sl, modes=(win, *others), why=_why(win, others[0] if others else None, wl),
        notes=_idle_notes(win, sl, wl) + _replica_notes(shape, topo, win, sl, wl))


def rescore(c: Candidate[D], shape: ModelShape, topo: Topology, imbalance: float, redundant: int) -> Candidate[D]:
    """Re-estimate a chosen candidate with the plan's exact slot layout (`redundant` replicas) and the
    expert imbalance the balancer actually reached."""
    dep = c.deployment
    if isinstance(dep, AggregatedDeployment):
        agg = dep.with_balance(max(1.0, imbalance), redundant)
        return Candidate(c.phase, agg, estimate_aggregated(shape, topo, agg))  # type: ignore[arg-type]
    new = replace(dep, imbalance=max(1.0, imbalance), redundant_experts=redundant)
    return Candidate(c.phase, new, estimate(shape, topo, new))


def best_per_shape(dec_ok: list[Candidate[DecodeDeployment]]
                   ) -> dict[tuple[str, int, int, int], Candidate[DecodeDeployment]]:
    """The best configuration of each decode shape (mode, instance, attention and MoE devices)."""
    by_shape: dict[tuple[str, int, int, int], Candidate[DecodeDeployment]] = {}
    for c in dec_ok:
        dep = c.deployment
        k = (dep.mode, c.instance_devices, dep.attention_devices, dep.moe_devices)
        if k not in by_shape or _key(c) > _key(by_shape[k]):
            by_shape[k] = c
    return by_shape
