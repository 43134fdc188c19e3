"""Heterogeneous topologies: assign prefill and decode to hardware groups, plan each phase on its group.

A mixed topology ("h100-cluster:8+h200-cluster:8", costmodels.topology.MixedTopology) joins groups of
different hardware over the scale-out network. `compile_mixed` tries every assignment of phases to
groups and keeps the one serving the most requests/s on the whole topology (output tokens/s per
device of the topology) under the TPOT / TTFT targets:

  Step 1: split assignments, prefill on group A and decode on group B, for every ordered pair A != B.
          Prefill candidates are searched on A's hardware, decode candidates on B's (planner.search,
          unchanged); each prefill candidate's TTFT carries the KV hand-off over the inter-group link
          (costmodels.handoff) instead of the in-group RDMA transfer.
  Step 2: for the best candidate of each decode shape and prefill size, instance counts: as many as
          each group packs, then the faster phase trimmed to the slower's rate; the inter-group link
          caps the rate at its bandwidth over the KV bytes of one request.
  Step 3: single-group assignments, each group alone with the other idle: the ordinary search on it.
  Step 4: the most requests/s wins; then fewer devices; then the listed order (splits first).

The chosen assignment is compiled like any plan (placement per group, balancing, re-scoring), with
device ids numbered group after group and each instance naming its group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from costmodels.errors import InfeasibleError, InputError
from costmodels.handoff import Handoff, kv_handoff
from costmodels.hardware import dtype_bytes
from costmodels.model_shape import ModelShape
from costmodels.serving import DecodeDeployment, Estimate, PrefillDeployment
from costmodels.topology import MixedTopology
from planner import __version__
from planner.balance.balancer import BalanceResult, balance
from planner.balance.loads import read_loads
from planner.compile import (CompileOptions, _frontier, _instances, _phase_plan, _placement, _PhasePlan,
                             _requests, _validate, balance_runs, frontier_point, memory_of, prediction_of,
                             stage_table)
from planner.frontend.shape import shape_from_traced
from planner.frontend.trace import trace
from planner.ir import plan as ir
from planner.placement import packed_count, place, topology_slice
from planner.search import (AnyDeployment, Candidate, Pins, SearchResult, Tally, _key, best_per_shape,
                            decode_candidates, pareto, prefill_candidates, rescore, search)


@dataclass(frozen=True)
class Assignment:
    """One way to put the phases on groups, its best plan, or why it has none."""

    prefill: str | None  # the group serving prefill; None with `decode`: both phases on that one group
    decode: str
    requests_per_s: float = 0.0
    devices_used: int = 0
    tpot_ms: float | None = None
    ttft_ms: float | None = None
    handoff: Handoff | None = None  # split assignments: the KV crossing between the groups
    bound: str = ""  # what limits the rate: "prefill", "decode" or "link"
    pre: Candidate[PrefillDeployment] | None = None
    dec: Candidate[DecodeDeployment] | None = None
    prefill_instances: int = 0
    decode_instances: int = 0
    frontier: tuple[Candidate[AnyDeployment], ...] = ()
    search: SearchResult | None = None  # single-group assignments: the group's own search
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def split(self) -> bool:
        return self.prefill is not None and self.prefill != self.decode

    @property
    def label(self) -> str:
        if self.split:
            return f"prefill on {self.prefill}, decode on {self.decode}"
        mode = f" ({self.search.mode})" if self.search is not None else ""
        return f"{self.decode} alone{mode}"


@dataclass(frozen=True)
class HeteroResult:
    """Every assignment tried (chosen first) and why the chosen one won."""

    topology: MixedTopology
    assignments: tuple[Assignment, ...]
    why: str

    @property
    def chosen(self) -> Assignment:
        return self.assignments[0]

    @property
    def side_by_side(self) -> float | None:
        """Requests/s of every group serving both phases on its own (the sum of the single-group plans),
        when each group has one. One plan cannot hold it (a phase has one deployment and one prediction),
        so it is never chosen; the summary names it when it beats the chosen assignment."""
        alone = [a for a in self.assignments if a.search is not None]
        if len(alone) < len(self.topology.groups):
            return None
        return sum(a.requests_per_s for a in alone)

    def side_by_side_note(self) -> str:
        """What to do when separate per-group plans would serve more than the chosen assignment."""
        both, win = self.side_by_side, self.chosen.requests_per_s
        if both is None or both <= win * (1 + 1e-6):
            return ""
        return (f"each group serving both phases on its own would serve {both:,.2f} req/s (+{(both / win - 1) * 100:.1f}%), "
                "which one plan cannot hold yet: compile each group separately for that")


def _with_handoff(c: Candidate[PrefillDeployment], h: Handoff) -> Candidate[PrefillDeployment]:
    """The prefill candidate with its in-group KV transfer replaced by the cross-group hand-off (in TTFT)."""
    est = c.estimate
    breakdown = dict(est.breakdown, kv_transfer=h.transfer_ms)
    details = dict(est.details, kv_handoff=h.to_dict())
    new: Estimate = replace(est, ttft_ms=est.step_ms + h.transfer_ms, breakdown=breakdown, details=details)
    return Candidate(c.phase, c.deployment, new)


def _best_per_shape(dec_ok: list[Candidate[DecodeDeployment]]) -> list[Candidate[DecodeDeployment]]:
    return sorted(best_per_shape(dec_ok).values(), key=_key, reverse=True)


def _split(shape: ModelShape, mixed: MixedTopology, a: str, b: str, wl: ir.Workload, pins: Pins) -> Assignment:
    """Steps 1-2: prefill on group a, decode on group b."""
    ta, tb = mixed.group(a).topology, mixed.group(b).topology
    sla, slb = topology_slice(ta), topology_slice(tb)
    link, latency = mixed.link_gbps(a, b), mixed.link_latency_us(a, b)
    pre_all = prefill_candidates(shape, ta, wl, pins, Tally(), sla)
    dec_all = decode_candidates(shape, tb, wl, pins, Tally(), slb)
    if not pre_all:
        return Assignment(a, b, error=f"no memory-feasible prefill configuration on {a}")
    if not dec_all:
        return Assignment(a, b, error=f"no memory-feasible decode configuration on {b}")
    pre_all = [_with_handoff(p, kv_handoff(shape, ta, p.deployment, link, latency)) for p in pre_all]
    dec_ok = [c for c in dec_all if wl.tpot_slo_ms is None or (c.estimate.tpot_ms or 0.0) <= wl.tpot_slo_ms]
    pre_ok = [p for p in pre_all if wl.ttft_slo_ms is None or (p.estimate.ttft_ms or 0.0) <= wl.ttft_slo_ms]
    if not dec_ok:
        reach = min(c.estimate.tpot_ms or math.inf for c in dec_all)
        return Assignment(a, b, error=f"no decode configuration on {b} meets --tpot-ms {wl.tpot_slo_ms:g} "
                                      f"(best {reach:.1f} ms)")
    if not pre_ok:
        reach = min(p.estimate.ttft_ms or math.inf for p in pre_all)
        return Assignment(a, b, error=f"no prefill configuration on {a} meets --ttft-ms {wl.ttft_slo_ms:g} with "
                                      f"the KV hand-off to {b} (best {reach:.0f} ms)")
    by_size: dict[int, Candidate[PrefillDeployment]] = {}
    for p in pre_ok:
        if p.instance_devices not in by_size or _key(p) > _key(by_size[p.instance_devices]):
            by_size[p.instance_devices] = p
    per_request = kv_handoff(shape, ta, pre_ok[0].deployment, link, latency).bytes_per_request
    best: tuple[tuple, Assignment] | None = None
    for pre in sorted(by_size.values(), key=_key, reverse=True):
        np_max = packed_count(sla, pre.instance_devices)
        pre_rate = pre.tput * pre.instance_devices / wl.input_len  # requests/s one prefill instance admits
        for dec in _best_per_shape(dec_ok):
            nd_max = packed_count(slb, dec.instance_devices)
            if np_max < 1 or nd_max < 1:
                continue
            dec_rate = dec.tput * dec.instance_devices / wl.output_len  # requests/s one decode instance finishes
            rate = min(np_max * pre_rate, nd_max * dec_rate)
            # the faster phase keeps only the instances the slower one can feed (the rest would idle)
            np_ = min(np_max, math.ceil(rate / pre_rate - 1e-9))
            nd = min(nd_max, math.ceil(rate / dec_rate - 1e-9))
            senders = min(np_ * sla.span(pre.instance_devices), nd * slb.span(dec.instance_devices))
            link_rate = senders * link * 1e9 / per_request  # every request's KV crosses the link once
            bound = "prefill" if np_ * pre_rate <= nd * dec_rate else "decode"
            if link_rate < rate:
                rate, bound = link_rate, "link"
            used = np_ * sla.span(pre.instance_devices) + nd * slb.span(dec.instance_devices)
            score = (round(rate, 6), -used, round(dec.tput, 6), round(pre.tput, 6))
            if best is None or score > best[0]:
                h = kv_handoff(shape, ta, pre.deployment, link, latency)
                best = (score, Assignment(a, b, rate, used, dec.estimate.tpot_ms, pre.estimate.ttft_ms, h, bound,
                                          pre, dec, np_, nd))
    if best is None:
        return Assignment(a, b, error=f"no instance fits {a} for prefill and {b} for decode")
    frontier = tuple(pareto(dec_ok)) + tuple(sorted(by_size.values(), key=lambda c: c.instance_devices))
    return replace(best[1], frontier=frontier)


def _alone(shape: ModelShape, mixed: MixedTopology, g: str, wl: ir.Workload, pins: Pins, mode: str) -> Assignment:
    """Step 3: the whole service on group g (the other groups idle)."""
    try:
        sr = search(shape, mixed.group(g).topology, wl, pins, mode=mode)
    except (InfeasibleError, InputError) as exc:
        return Assignment(None, g, error=str(exc))
    ttft = sr.prefill.estimate.ttft_ms if sr.prefill is not None else sr.decode.estimate.ttft_ms
    return Assignment(g if sr.prefill is not None else None, g, sr.requests_per_s, sr.devices_used,
                      sr.decode.estimate.tpot_ms, ttft, search=sr)


def _why(win: Assignment, others: list[Assignment], mixed: MixedTopology) -> str:
    runner = next((o for o in others if o.ok), None)
    hw = {g.name: g.topology.hardware.name for g in mixed.groups}
    what = (f"prefill on {hw[win.prefill or '']}, decode on {hw[win.decode]}" if win.split
            else f"everything on {hw[win.decode]}")
    if runner is None:
        return f"{what}: the only assignment with a plan under these targets (see the table)"
    gain = (win.requests_per_s / runner.requests_per_s - 1.0) * 100 if runner.requests_per_s > 0 else math.inf
    bound = f"; bound by {win.bound}" if win.bound else ""
    return (f"{what}: {win.requests_per_s:,.2f} req/s vs {runner.requests_per_s:,.2f} for {runner.label} "
            f"(+{gain:.1f}%){bound}")


def assign(shape: ModelShape, mixed: MixedTopology, wl: ir.Workload, pins: Pins = Pins(),
           mode: str = "auto") -> HeteroResult:
    """Steps 1-4: every assignment of phases to groups, the best first; InfeasibleError when none has a plan."""
    tried: list[Assignment] = []
    if mode != "agg":  # a split is disaggregated serving by construction
        for a in mixed.groups:
            for b in mixed.groups:
                if a is not b:
                    tried.append(_split(shape, mixed, a.name, b.name, wl, pins))
    for g in mixed.groups:
        tried.append(_alone(shape, mixed, g.name, wl, pins, mode))
    ok = [t for t in tried if t.ok]
    if not ok:
        why = "; ".join(f"{t.label}: {t.error}" for t in tried)
        raise InfeasibleError(f"{shape.name} on {mixed.name}: no assignment of phases to groups has a plan ({why})")
    order = {id(t): i for i, t in enumerate(tried)}
    win = max(ok, key=lambda t: (round(t.requests_per_s, 6), -t.devices_used, -order[id(t)]))
    rest = sorted((t for t in tried if t is not win), key=lambda t: (not t.ok, -t.requests_per_s, order[id(t)]))
    return HeteroResult(mixed, (win, *rest), _why(win, rest, mixed))


# --- the plan ------------------------------------------------------------------------------------


def _offset(pp: _PhasePlan, first: int) -> None:
    """Move a phase's slots from its group's own numbering to the mixed topology's."""
    def shift(ids: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(first + d for d in ids)

    pp.slots_of = [replace(s, devices=shift(s.devices), attention_devices=shift(s.attention_devices),
                           expert_devices=shift(s.expert_devices),
                           shared_expert_devices=shift(s.shared_expert_devices)) for s in pp.slots_of]


def _frontier_split(win: Assignment, final: dict[str, Candidate[AnyDeployment]]) -> tuple[ir.FrontierPoint, ...]:
    chosen = {c.deployment for c in final.values()}
    points = []
    seen: set = set()
    for c, is_chosen in [*((c, False) for c in win.frontier if c.deployment not in chosen),
                         *((final[n], True) for n in ("prefill", "decode") if n in final)]:
        if c.deployment in seen:
            continue
        seen.add(c.deployment)
        points.append(frontier_point(c, is_chosen))
    return tuple(points)


def _assignment_runs(res: HeteroResult) -> tuple[ir.SolverRun, ...]:
    """Each assignment tried, as the plan's record of why its groups serve what they serve."""
    runs = []
    for i, t in enumerate(res.assignments):
        status = "CHOSEN" if i == 0 else ("FEASIBLE" if t.ok else "INFEASIBLE")
        runs.append(ir.SolverRun(name=f"assign {t.label}", solver="enumerate", status=status,
                                 objective=round(t.requests_per_s, 6) if t.ok else None))
    return tuple(runs)


def compile_mixed(model: str, mixed: MixedTopology, opts: CompileOptions,
                  progress: Callable[[str], None] | None = None) -> tuple[ir.Plan, HeteroResult]:
    """The plan for a mixed topology and the assignments behind it."""
    say = progress or (lambda _msg: None)
    _validate(opts)
    if opts.devices is not None:
        raise InputError(f"--devices {opts.devices}: a mixed topology ({mixed.name}) is planned whole; drop "
                         "--devices, or name smaller groups (e.g. h100-cluster:2+h200-cluster:2)")
    if opts.rate is not None:
        raise InputError(f"--rate {opts.rate:g}: not supported on a mixed topology ({mixed.name}) yet; drop --rate")
    wl = opts.workload
    for grp in mixed.groups:
        if not grp.topology.hardware.supports_weights(wl.quant):
            raise InputError(f"--quant {wl.quant}: {grp.topology.hardware.name} (group {grp.name}) does not support "
                             "it; choose a precision every group runs")
    say(f"tracing {model}")
    traced = trace(model)
    shape = shape_from_traced(traced)
    say(f"running the stage-split pass pipeline on {model}")
    table = stage_table(traced, shape)
    loads = read_loads(opts.loads, layers=shape.num_moe_layers, experts=shape.num_routed_experts, seed=opts.seed)
    say(f"assigning phases to the groups of {mixed.name}")
    res = assign(shape, mixed, wl, opts.pins, opts.mode)
    win = res.chosen

    # (phase plan, its group) for the chosen assignment
    parts: list[tuple[_PhasePlan, str]] = []
    sr = win.search
    if sr is not None:
        topo = mixed.group(win.decode).topology
        if sr.prefill is not None:
            parts.append((_phase_plan("prefill", sr.prefill, sr.prefill_instances, shape, topo), win.decode))
        parts.append((_phase_plan("decode", sr.decode, sr.decode_instances, shape, topo), win.decode))
    else:
        assert win.pre is not None and win.dec is not None and win.prefill is not None
        parts.append((_phase_plan("prefill", win.pre, win.prefill_instances, shape,
                                  mixed.group(win.prefill).topology), win.prefill))
        parts.append((_phase_plan("decode", win.dec, win.decode_instances, shape,
                                  mixed.group(win.decode).topology), win.decode))
    by_group: dict[str, list[_PhasePlan]] = {}
    for pp, g in parts:
        by_group.setdefault(g, []).append(pp)
    for g, pps in by_group.items():  # phases sharing a group are placed together, as compile places them
        group = mixed.group(g)
        slots = place(group.topology, [r for pp in pps for r in _requests(pp)])
        for pp in pps:
            pp.slots_of = [s for s in slots if s.id.startswith(pp.name + "-")]
            _offset(pp, group.first_device)

    balances: dict[str, BalanceResult] = {}
    for pp, g in parts:
        topo = mixed.group(g).topology
        say(f"balancing {shape.num_moe_layers} layers for {pp.name} on {g}: {pp.routed} devices x {pp.slots} slots")
        bal = balance(loads, pp.routed, pp.slots, nodes=1, algorithm="ilp", split=opts.split,
                      time_limit=opts.time_limit, seed=opts.seed)
        balances[pp.name] = bal
        pp.cand = rescore(pp.cand, shape, topo, float(np.mean(bal.max_over_mean)), pp.redundant)
        if win.split and pp.name == "prefill":  # re-scoring re-ran estimate_prefill: put the hand-off back
            assert win.handoff is not None and isinstance(pp.cand.deployment, PrefillDeployment)
            h = kv_handoff(shape, topo, pp.cand.deployment, win.handoff.link_gbps_per_device,
                           mixed.link_latency_us(win.prefill or "", win.decode))
            pp.cand = _with_handoff(pp.cand, h)  # type: ignore[arg-type]

    has_shared = shape.num_shared_experts > 0 and shape.params_shared > 0
    phase_ir = {}
    for pp, g in parts:
        topo = mixed.group(g).topology
        est = pp.cand.estimate
        phase_ir[pp.name] = ir.Phase(
            instances=tuple(replace(i, group=g) for i in _instances(pp, topo, has_shared)),
            experts=(_placement(balances[pp.name], shape.moe_layers),),
            predictions=prediction_of(est), memory=memory_of(est, pp.mode, topo.dies_per_device))
    final = {pp.name: pp.cand for pp, _ in parts}
    frontier = _frontier(sr, final) if sr is not None else _frontier_split(win, final)
    topo_info = ir.TopologyInfo.from_topology(mixed)
    plan = ir.Plan(
        schema_version=ir.version_needed(topo_info),
        model=ir.ModelInfo.from_shape(shape, traced.source.digest(), dtype_bytes(wl.quant)),
        topology=topo_info, workload=wl, stages=table.stages,
        provenance=ir.Provenance(podplan_version=__version__, seed=opts.seed,
                                 options=dict(opts.to_dict(), model=model, topology=mixed.name),
                                 solvers=_assignment_runs(res) + balance_runs([pp for pp, _ in parts], balances,
                                                                              shape.moe_layers),
                                 passes=table.passes),
        prefill=phase_ir.get("prefill"), decode=phase_ir["decode"], frontier=frontier,
    )
    return plan, res


def summary(res: HeteroResult, wl: ir.Workload) -> list[dict]:
    """One row per assignment (chosen first): what `compile` prints for a mixed topology."""
    rows = []
    for i, t in enumerate(res.assignments):
        row: dict = {"assignment": t.label, "chosen": i == 0, "prefill_group": t.prefill, "decode_group": t.decode}
        if not t.ok:
            rows.append(dict(row, error=t.error))
            continue
        row.update(requests_per_s=round(t.requests_per_s, 4), devices_used=t.devices_used,
                   output_tokens_per_s_per_device=round(t.requests_per_s * wl.output_len
                                                        / res.topology.num_devices, 4),
                   tpot_ms=None if t.tpot_ms is None else round(t.tpot_ms, 4),
                   ttft_ms=None if t.ttft_ms is None else round(t.ttft_ms, 4), bound=t.bound or None)
        if t.handoff is not None:
            row["kv_handoff"] = t.handoff.to_dict()
        rows.append(row)
    return rows

