"""A plan's serving instances as cost-model deployments, and their step times at any batch.

Step times come from `costmodels.serving` (the model `compile` scores with), evaluated at the batch
and lengths the simulation actually has and cached by (batch bucket, length bucket).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from costmodels.aggregated import AggregatedDeployment, chunk_ms, estimate_aggregated
from costmodels.errors import InputError
from costmodels.model_shape import ModelShape
from costmodels.serving import DecodeDeployment, PrefillDeployment, estimate_decode, estimate_prefill
from costmodels.topology import Topology, get_topology
from planner.ir.plan import Instance, Phase, Plan, Workload

# Buckets: counts up to EXACT_UP_TO exactly, then geometric steps of BUCKET_RATIO (a step time is
# evaluated at the bucket's upper edge, so the simulation never runs faster than the model says).
EXACT_UP_TO = 32
BUCKET_RATIO = 1.02


def bucket_edges(cap: int) -> np.ndarray:
    """[cap + 1] the bucket upper edge of every count 0..cap (monotone, edge(n) >= n, edge(cap) = cap)."""
    edges = np.arange(cap + 1, dtype=np.int64)
    if cap > EXACT_UP_TO:
        n = edges[EXACT_UP_TO + 1:].astype(float)
        k = np.ceil(np.log(n / EXACT_UP_TO) / math.log(BUCKET_RATIO) - 1e-9)
        edges[EXACT_UP_TO + 1:] = np.minimum(cap, np.ceil(EXACT_UP_TO * BUCKET_RATIO ** k - 1e-9)).astype(np.int64)
    return edges


def length_bucket(tokens: float) -> int:
    """A mean length rounded to the nearest BUCKET_RATIO step (>= 1 token)."""
    if tokens <= 1:
        return 1
    return max(1, int(round(BUCKET_RATIO ** round(math.log(tokens) / math.log(BUCKET_RATIO)))))


@dataclass
class DecodeInstance:
    """One decode instance: its deployment at the plan's batch, capacity and a step-time cache."""

    name: str
    dep: DecodeDeployment
    devices: int  # all devices of the instance
    attention_devices: int
    cap: int  # most sequences in flight: the plan's batch
    kv_budget: float  # KV tokens the instance can hold (from the plan-batch estimate's free memory)
    edges: np.ndarray = field(repr=False)
    cache: dict = field(default_factory=dict, repr=False)
    chunks: Chunks | None = None  # aggregated: the instance also runs prefill, in chunks inside its steps

    def step_ms(self, shape: ModelShape, topo: Topology, n: int, kv_len: float) -> float:
        """One decode step of `n` sequences of mean context `kv_len` (ms)."""
        key = (int(self.edges[n]), length_bucket(kv_len))
        ms = self.cache.get(key)
        if ms is None:
            dep = replace(self.dep, batch_per_device=key[0] / self.attention_devices, kv_len=key[1])
            ms = self.cache[key] = estimate_decode(shape, topo, dep).step_ms
        return ms


@dataclass
class Chunks:
    """The prefill side of an aggregated instance: prompt tokens mixed into each decode step."""

    dep: AggregatedDeployment
    budget: int  # prompt tokens per step (the cost model's chunk per device x devices)
    piece: int  # most tokens of one prompt per step (one die's share: a prompt sits on one attention DP rank)
    edges: np.ndarray = field(repr=False)
    cache: dict = field(default_factory=dict, repr=False)

    def ms(self, shape: ModelShape, topo: Topology, tokens: int) -> float:
        """What `tokens` prompt tokens add to a step (ms): costmodels.aggregated.chunk_ms, bucketed."""
        if tokens <= 0:
            return 0.0
        key = int(self.edges[min(self.budget, tokens)])
        hit = self.cache.get(key)
        if hit is None:
            hit = self.cache[key] = chunk_ms(shape, topo, self.dep, key / self.dep.devices)
        return hit


@dataclass
class PrefillInstance:
    """One prefill instance: its token budget per batch, the longest piece of a prompt per batch, a cache."""

    name: str
    dep: PrefillDeployment
    devices: int
    dies: int
    budget: int  # prompt tokens per batch (tokens per device x devices)
    piece: int  # most tokens of one prompt per batch (one attention die or TP group holds a prompt)
    edges: np.ndarray = field(repr=False)
    cache: dict = field(default_factory=dict, repr=False)

    def batch_ms(self, shape: ModelShape, topo: Topology, tokens: int, longest: int, prompt_len: float
                 ) -> tuple[float, float]:
        """(batch time, KV transfer time) in ms for `tokens` prompt tokens whose longest piece is
        `longest`, costed as prompts of `prompt_len` tokens. The busiest die sets the pace: at least
        the longest piece sits on one die (attention is data-parallel over dies)."""
        per_die = max(tokens / self.dies, longest / self.dep.attn_tp)
        key = (int(self.edges[min(self.budget, math.ceil(per_die * self.dies))]), length_bucket(prompt_len))
        hit = self.cache.get(key)
        if hit is None:
            # whole tokens per device, as the deployment takes them (under one token of rounding per device)
            dep = replace(self.dep, tokens_per_device=max(1, round(key[0] / self.devices)), prompt_len=key[1])
            est = estimate_prefill(shape, topo, dep)
            assert est.ttft_ms is not None
            hit = self.cache[key] = (est.step_ms, est.ttft_ms - est.step_ms)
        return hit


@dataclass
class Fleet:
    """What the simulation serves with: instances of both phases, the workload's MTP and SLOs."""

    name: str
    shape: ModelShape
    topo: Topology
    workload: Workload
    prefill: list[PrefillInstance]
    decode: list[DecodeInstance]
    devices: int  # distinct devices of the instances

    @property
    def nominal_latency_s(self) -> float:
        """One request of the workload's lengths: its prompt prefilled alone plus its decode at the plan's
        batch (s). Not the plan's TTFT: that is a full prefill batch (seconds when the search packs
        32k tokens per device), which no request waits for below capacity and the drain does not see."""
        wl = self.workload
        ttft = 0.0
        for d in self.decode:
            if d.chunks is not None:  # aggregated: the prompt's pieces ride on steps of one sequence
                c = d.chunks
                piece = min(wl.input_len, c.piece)
                step = d.step_ms(self.shape, self.topo, 1, wl.input_len) + c.ms(self.shape, self.topo, piece)
                ttft = max(ttft, math.ceil(wl.input_len / piece) * step)
        for p in self.prefill:
            piece = min(wl.input_len, p.piece, p.budget)
            ms, kv_ms = p.batch_ms(self.shape, self.topo, piece, piece, piece)
            ttft = max(ttft, math.ceil(wl.input_len / piece) * ms + kv_ms)
        tpot = max(estimate_decode(self.shape, self.topo, d.dep).tpot_ms or 0.0 for d in self.decode)
        return (ttft + (wl.output_len - 1) * tpot) / 1e3

    @property
    def aggregated(self) -> bool:
        """No prefill instances: the decode instances run prefill chunks inside their steps."""
        return not self.prefill

    @property
    def design_rate(self) -> float:
        """Requests/s the instances sustain at the plan's batches and workload lengths (the slower phase,
        as `planner.search.split_devices` computes it)."""
        wl = self.workload
        if self.aggregated:  # as planner.search's aggregated mode: the mixed steps' output tokens
            return sum(estimate_aggregated(self.shape, self.topo, d.chunks.dep).throughput_per_device * d.devices
                       for d in self.decode if d.chunks is not None) / wl.output_len
        dec = sum(estimate_decode(self.shape, self.topo, d.dep).throughput_per_device * d.devices
                  for d in self.decode) / wl.output_len
        pre = sum(estimate_prefill(self.shape, self.topo, p.dep).throughput_per_device * p.devices
                  for p in self.prefill) / wl.input_len
        return min(dec, pre)


def _imbalance_and_redundant(phase: Phase, inst: Instance, experts: int) -> tuple[float, int]:
    """What compile re-scores with: the mean over layers of max/mean device load, and the slots
    beyond one per expert."""
    placement = phase.experts[inst.experts]
    balances = [lp.balance for lp in placement.layers if lp.balance is not None]
    imbalance = max(1.0, float(np.mean(balances))) if balances else 1.0
    return imbalance, placement.slots - experts


def decode_instance(name: str, dep: DecodeDeployment, shape: ModelShape, topo: Topology) -> DecodeInstance:
    """A decode instance from its deployment at the plan's batch."""
    est = estimate_decode(shape, topo, dep)
    if dep.mode == "disaggregated":
        attn, devices = dep.attention_devices, dep.attention_devices + dep.moe_devices
        seqs_per_die = est.details["sequences_per_attention_die"]
    else:
        attn = devices = dep.devices or topo.num_devices
        seqs_per_die = est.details["sequences_per_die"]
    cap = max(1, int(round(dep.batch_per_device * attn)))
    # KV room: the die holding KV with the least free memory, in tokens at the estimate's bytes per token
    budgets = []
    for use in est.memory.values():
        if use.get("kv", 0.0) <= 0:
            continue
        free = use["capacity"] - (use["total"] - use["kv"])
        budgets.append(free / (use["kv"] / (seqs_per_die * dep.kv_len)) * attn * topo.dies_per_device)
    if not est.feasible or (budgets and min(budgets) <= 0):
        raise InputError(f"{name}: the cost model says it does not fit in memory at the plan's batch "
                         f"({est.infeasible_reason or 'no room for KV'}); recompile the plan")
    return DecodeInstance(name, dep, devices, attn, cap, min(budgets) if budgets else math.inf, bucket_edges(cap))


def prefill_instance(name: str, dep: PrefillDeployment, shape: ModelShape, topo: Topology) -> PrefillInstance:
    """A prefill instance from its deployment at the plan's batch."""
    est = estimate_prefill(shape, topo, dep)
    if not est.feasible:
        raise InputError(f"{name}: the cost model says it does not fit in memory at the plan's batch "
                         f"({est.infeasible_reason}); recompile the plan")
    devices = dep.devices or topo.num_devices
    dies = devices * topo.dies_per_device
    budget = max(1, int(round(dep.tokens_per_device * devices)))
    piece = max(1, int(dep.tokens_per_device / topo.dies_per_device * dep.attn_tp))
    return PrefillInstance(name, dep, devices, dies, budget, piece, bucket_edges(budget))


def fleet_of_plan(plan: Plan, shape: ModelShape | None = None) -> Fleet:
    """The plan's instances as deployments, built the way `podplan compile` scores them (the plan's
    own predictions are reproduced at its batch: tests/planner/test_simulate.py checks it). A plan
    without a prefill phase is aggregated: its decode instances get the chunks they prefill with."""
    if plan.decode is None:
        raise InputError("plan has no decode phase: the simulation serves requests through prefill and decode; "
                         "recompile the plan")
    topo = get_topology(plan.topology.name)
    if shape is None:
        shape = model_shape_of(plan)
    wl = plan.workload
    E = shape.num_routed_experts
    prefill = []
    pre_phase = plan.prefill  # None: an aggregated plan, its decode instances prefill (chunks below)
    for inst in (pre_phase.instances if pre_phase is not None else ()):
        assert pre_phase is not None
        imb, red = _imbalance_and_redundant(pre_phase, inst, E)
        pdep = PrefillDeployment(devices=len(inst.devices), tokens_per_device=int(round(inst.batch_per_device)),
                                prompt_len=wl.input_len, microbatches=inst.microbatches, prefix_hit=wl.prefix_hit,
                                quant=wl.quant, imbalance=imb, attn_tp=inst.attention_tp, redundant_experts=red)
        prefill.append(prefill_instance(inst.id, pdep, shape, topo))
    decode = []
    for inst in plan.decode.instances:
        imb, red = _imbalance_and_redundant(plan.decode, inst, E)
        common = DecodeDeployment(batch_per_device=inst.batch_per_device, microbatches=inst.microbatches,
                                  kv_len=wl.input_len + wl.output_len // 2, mtp_accept=wl.mtp_accept,
                                  quant=wl.quant, imbalance=imb, attn_tp=inst.attention_tp, redundant_experts=red)
        if inst.mode == "disaggregated":
            moe = len(set(inst.devices) - set(inst.attention_devices))
            dep = replace(common, mode="disaggregated", attention_devices=len(inst.attention_devices),
                          moe_devices=moe, dp_domains=inst.dp_domains)
        else:
            dep = replace(common, mode="colocated", devices=len(inst.devices))
        d = decode_instance(inst.id, dep, shape, topo)
        if plan.prefill is None:  # aggregated: this instance also prefills (what compile scored it with)
            d.chunks = chunks_of(AggregatedDeployment(dep, input_len=wl.input_len, output_len=wl.output_len,
                                                      prefix_hit=wl.prefix_hit), topo)
        decode.append(d)
    devices = len({d for _, inst in plan.instances() for d in inst.devices})
    return Fleet(f"{plan.model.name} on {plan.topology.name}", shape, topo, wl, prefill, decode, devices)


def chunks_of(agg: AggregatedDeployment, topo: Topology) -> Chunks:
    """The chunk budget of an aggregated instance: the cost model's chunk per device (whole tokens, as
    costmodels.aggregated prices it) on every device, one die's share per prompt."""
    per_device = math.ceil(agg.chunk_tokens_per_device)
    budget = per_device * agg.devices
    piece = max(1, int(agg.chunk_tokens_per_device / topo.dies_per_device))
    return Chunks(agg, budget, piece, bucket_edges(budget))


def model_shape_of(plan: Plan) -> ModelShape:
    """The plan's model shape: bundled models only (a plan does not carry a user config)."""
    from planner.frontend.shape import shape_of
    from planner.frontend.zoo import BUNDLED, load_source

    name = plan.model.name
    if name not in BUNDLED:
        raise InputError(f"{name[:80]!r} is not a bundled model; simulate re-scores a plan's instances with the "
                         "cost model and needs the bundled config (see `podplan models`)")
    if load_source(name).digest() != plan.model.config_sha256:
        raise InputError(f"plan.model.config_sha256 is not the bundled {name} config's digest; recompile the plan")
    return shape_of(name)
