"""The compile driver: trace -> stage-split pass pipeline -> search -> balance -> placement -> Plan.

`compile_plan(model, topology, options)` is the whole pipeline behind `podplan compile`; it returns
the Plan IR object (`planner.ir.plan.Plan`), which `planner.ir.plan.write_plan` serialises.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Callable

import numpy as np

from costmodels.errors import InfeasibleError, InputError
from costmodels.hardware import dtype_bytes
from costmodels.memory import expert_layout
from costmodels.model_shape import ModelShape
from costmodels.aggregated import AggregatedDeployment
from costmodels.serving import DECODE_MODES, DecodeDeployment, PrefillDeployment
from costmodels.topology import Topology, get_topology
from planner import __version__
from planner.ir import plan as ir
from planner.balance.balancer import BalanceResult, balance
from planner.frontend.trace import Traced, trace
from planner.balance.loads import read_loads
from planner.placement import InstanceRequest, InstanceSlot, place
from planner.search import (SEARCH_MODES, AnyDeployment, Candidate, Imbalance, ModeResult, Pins, SearchResult,
                            config_line, rescore, search)
from planner.frontend.shape import shape_from_traced
from planner.frontend.stages import TRAFFIC_KINDS, StagedProgram, compile_stages, stage_rows


# What `podplan compile` serves when no flag says otherwise: CloudMatrix-Infer's setting
# (4K prompts, 1K outputs, INT8 weights, a 50 ms TPOT target).
DEFAULT_WORKLOAD = ir.Workload(input_len=4096, output_len=1024, quant="int8", tpot_slo_ms=50.0)
# Workload fields whose `podplan compile` flag has another name (the provenance records flag names).
_FLAG_OF = {"tpot_slo_ms": "tpot_ms", "ttft_slo_ms": "ttft_ms"}


@dataclass(frozen=True)
class CompileOptions:
    """Everything `podplan compile` takes besides the model and topology (defaults: docs/cli.md):
    the workload the plan serves (the plan's own `Workload` record), the search pins and the
    balancer's settings."""

    workload: ir.Workload = DEFAULT_WORKLOAD
    pins: Pins = Pins()
    loads: str = "uniform"
    time_limit: float = 0.5  # balancer seconds per sub-problem (deterministic CP-SAT time)
    seed: int = 0
    split: str = "equal"
    mode: str = "auto"  # agg | disagg | auto (compare both)
    devices: int | None = None  # plan on the first N devices of the topology (None: all)
    rate: float | None = None  # req/s: choose the decode deployment with the most simulated goodput

    def to_dict(self) -> dict:
        """Flat, sorted, keyed by flag (--tpot-ms -> tpot_ms): what the plan's provenance records."""
        flat = {_FLAG_OF.get(k, k): v for k, v in self.workload.to_dict().items()}
        flat.update({f.name: getattr(self.pins, f.name) for f in fields(self.pins)})
        flat.update({f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("workload", "pins")})
        if self.rate is None:  # plans compiled without --rate keep their bytes
            del flat["rate"]
        return dict(sorted(flat.items()))


def workload_from_flags(*, tpot_ms: float | None, ttft_ms: float | None, input_len: int, output_len: int,
                        prefix_hit: float, quant: str, mtp_accept: float) -> ir.Workload:
    """The plan's Workload from `podplan compile` flags; a bad value is an InputError naming its flag."""
    if tpot_ms is not None and tpot_ms <= 0:
        raise InputError(f"--tpot-ms {tpot_ms}: must be > 0")
    if ttft_ms is not None and ttft_ms <= 0:
        raise InputError(f"--ttft-ms {ttft_ms}: must be > 0")
    if input_len <= 0 or output_len <= 0:
        raise InputError(f"--input-len/--output-len must be > 0 (got {input_len}, {output_len})")
    if not 0.0 <= prefix_hit < 1.0:
        raise InputError(f"--prefix-hit {prefix_hit}: must be in [0, 1)")
    if not 0.0 <= mtp_accept <= 1.0:
        raise InputError(f"--mtp-accept {mtp_accept}: must be in [0, 1]")
    return ir.Workload(input_len=input_len, output_len=output_len, prefix_hit=prefix_hit, quant=quant,
                       mtp_accept=mtp_accept, tpot_slo_ms=tpot_ms, ttft_slo_ms=ttft_ms)


@dataclass
class _PhasePlan:
    """Working state of one phase between search and IR."""

    name: str
    cand: Candidate[AnyDeployment]
    count: int
    mode: ir.Mode
    attention: int  # devices per instance running attention
    routed: int  # devices per instance holding routed-expert slots
    shared: int  # devices per instance computing shared experts only (0: replicated on routed)
    slots: int  # routed slots per routed device
    redundant: int  # routed slots beyond one per expert (the cost model is re-run with exactly this)
    slots_of: list[InstanceSlot] = field(default_factory=list)


def _validate(opts: CompileOptions) -> None:
    """The options the Workload record does not check itself (it validates on construction)."""
    pins = opts.pins
    if opts.time_limit <= 0:
        raise InputError(f"--time-limit {opts.time_limit}: must be > 0 seconds")
    if opts.seed < 0:
        raise InputError(f"--seed {opts.seed}: must be >= 0")
    if opts.mode not in SEARCH_MODES:
        raise InputError(f"--mode {opts.mode}: use one of {', '.join(SEARCH_MODES)}")
    if opts.devices is not None and opts.devices <= 0:
        raise InputError(f"--devices {opts.devices}: must be > 0")
    if opts.rate is not None and not 0 < opts.rate < math.inf:
        raise InputError(f"--rate {opts.rate}: must be a finite number of requests/s > 0")
    for flag in ("decode_devices", "attention_devices", "moe_devices", "prefill_devices", "attention_tp"):
        value = getattr(pins, flag)
        if value is not None and value <= 0:
            raise InputError(f"--{flag.replace('_', '-')} {value}: must be > 0")
    if pins.decode_mode is not None and pins.decode_mode not in DECODE_MODES:
        raise InputError(f"--decode-mode {pins.decode_mode}: use one of {', '.join(DECODE_MODES)}")
    if (pins.attention_devices is None) != (pins.moe_devices is None):
        raise InputError("--attention-devices and --moe-devices go together (a disaggregated decode instance)")
    if pins.decode_devices is not None and pins.attention_devices is not None:
        raise InputError("--decode-devices pins a colocated instance, --attention/--moe-devices a disaggregated one: give one")


def _layout(shape: ModelShape, topo: Topology, expert_devices: int) -> tuple[int, int, int, int]:
    """(routed devices, shared devices, slots per routed device, redundant) for an EP group.

    Starts from the published layout (costmodels.memory.expert_layout) and rounds it to whole
    devices: EP > E gives one slot per die and dedicated shared-expert dies; EP <= E gives
    ceil(E / EP) (+1 redundant) slots per die with the shared expert replicated. A device never holds
    more slots than the model has experts (two replicas of one expert on one device serve nothing:
    the balancer refuses it), so a one-device instance of a 128-expert model gets 128 slots, not 130.
    """
    d = topo.dies_per_device
    E = shape.num_routed_experts
    lay = expert_layout(shape, expert_devices * d)
    if lay.shared_dies > 0 and lay.shared_dies < expert_devices * d:
        shared = math.ceil(lay.shared_dies / d)
        routed = expert_devices - shared
        slots = d
    else:
        shared = 0
        routed = expert_devices
        slots = min(E, math.ceil((E + lay.redundant) / routed))
    if routed * slots < E:
        raise InputError(f"{shape.name}: {routed} expert devices x {slots} slots cannot hold {E} experts")
    return routed, shared, slots, routed * slots - E


def _phase_plan(name: str, cand: Candidate[AnyDeployment], count: int, shape: ModelShape,
                topo: Topology) -> _PhasePlan:
    dep = cand.deployment
    if isinstance(dep, DecodeDeployment) and dep.mode == "disaggregated":
        routed, shared, slots, red = _layout(shape, topo, dep.moe_devices)
        return _PhasePlan(name, cand, count, "disaggregated", dep.attention_devices, routed, shared, slots, red)
    routed, shared, slots, red = _layout(shape, topo, dep.devices)
    return _PhasePlan(name, cand, count, "colocated", dep.devices, routed, shared, slots, red)


def _requests(pp: _PhasePlan) -> list[InstanceRequest]:
    return [InstanceRequest(f"{pp.name}-{i}", pp.mode, pp.attention, pp.routed, pp.shared) for i in range(pp.count)]


def memory_of(est, mode: str, dies: int) -> dict[str, ir.MemoryUse]:
    """Per-die memory entries of the estimate -> per-device use by plan role."""
    out: dict[str, ir.MemoryUse] = {}
    for label, use in sorted(est.memory.items()):
        role = "both" if mode == "colocated" else ("attention" if "attention" in label else "experts")
        parts = {k: round(v * dies, 4) for k, v in use.items() if k not in ("total", "capacity")}
        cur = ir.MemoryUse(used_gb=round(use["total"] * dies, 4), capacity_gb=round(use["capacity"] * dies, 4),
                           breakdown=parts)
        if role not in out or cur.used_gb > out[role].used_gb:
            out[role] = cur
    return out


def prediction_of(est) -> ir.Prediction:
    return ir.Prediction(
        step_ms=est.step_ms, throughput_per_device=est.throughput_per_device,
        breakdown=dict(est.breakdown),
        tpot_ms=est.tpot_ms, ttft_ms=est.ttft_ms, feasible=est.feasible, infeasible_reason=est.infeasible_reason,
    )


def _placement(res: BalanceResult, moe_layers: tuple[int, ...]) -> ir.ExpertPlacement:
    layers = []
    for i, layer in enumerate(moe_layers):
        shares = tuple(float(x) for x in res.shares[i]) if res.shares is not None else None
        layers.append(ir.LayerPlacement(
            layer=layer, phy2log=tuple(int(x) for x in res.phy2log[i]), shares=shares,
            device_loads=tuple(float(x) for x in res.device_loads[i]),
        ))
    return ir.ExpertPlacement(devices=res.devices, slots_per_device=res.slots_per_device, layers=tuple(layers),
                              algorithm=f"{res.algorithm}/{res.split}")


def _instances(pp: _PhasePlan, topo: Topology, shape_has_shared: bool) -> tuple[ir.Instance, ...]:
    d = topo.dies_per_device
    dep = pp.cand.deployment
    tp = dep.attn_tp
    out = []
    for slot in pp.slots_of:
        if not shape_has_shared:
            slot = replace(slot, shared_expert_devices=())
        attn_dies = len(slot.attention_devices) * d
        out.append(ir.Instance(
            id=slot.id, mode=pp.mode, devices=slot.devices, attention_devices=slot.attention_devices,
            expert_devices=slot.expert_devices, shared_expert_devices=slot.shared_expert_devices,
            attention_dp=attn_dies // tp, attention_tp=tp,
            ep=ir.expert_parallel_dies(slot.expert_devices, slot.shared_expert_devices, d),
            microbatches=dep.microbatches,
            batch_per_device=dep.tokens_per_device if isinstance(dep, PrefillDeployment) else dep.batch_per_device,
            dp_domains=getattr(dep, "dp_domains", 1) if pp.mode == "disaggregated" else 1,
        ))
    return tuple(out)


def _solver_runs(sr: SearchResult, phases: list[_PhasePlan], balances: dict[str, BalanceResult],
                 moe_layers: tuple[int, ...]) -> tuple[ir.SolverRun, ...]:
    """The search, then per phase the balancer's worst layer (largest gap to its bound)."""
    runs = [ir.SolverRun(name=f"search ({sr.mode})", solver="enumerate", status="EXHAUSTIVE",
                         objective=round(sr.requests_per_s, 6))]
    return tuple(runs) + balance_runs(phases, balances, moe_layers)


def balance_runs(phases: list[_PhasePlan], balances: dict[str, BalanceResult],
                 moe_layers: tuple[int, ...]) -> tuple[ir.SolverRun, ...]:
    """Per phase, the balancer's worst layer (largest gap to its bound)."""
    runs = []
    for pp in phases:
        res = balances[pp.name]
        worst = int(np.argmax(res.gap))
        runs.append(ir.SolverRun(
            name=f"balance {pp.name} (worst of {res.layers} layers: layer {moe_layers[worst]})",
            solver=res.algorithm, status=_status_summary(res.status),
            objective=float(res.max_over_mean[worst]),
            bound=float(res.max_over_mean[worst] / (1.0 + res.gap[worst])),
            gap=float(res.gap[worst]),
        ))
    return tuple(runs)


def _status_summary(statuses: tuple[str, ...]) -> str:
    counts: dict[str, int] = {}
    for s in statuses:
        counts[s] = counts.get(s, 0) + 1
    return ",".join(f"{k}x{v}" for k, v in sorted(counts.items()))


def frontier_point(c: Candidate[AnyDeployment], chosen: bool) -> ir.FrontierPoint:
    """One searched configuration as the plan's frontier record."""
    return ir.FrontierPoint(phase="prefill" if c.phase == "prefill" else "decode", throughput_per_device=c.tput,
                            config=config_line(c), tpot_ms=c.estimate.tpot_ms, ttft_ms=c.estimate.ttft_ms,
                            chosen=chosen)


def _frontier(sr: SearchResult, final: dict[str, Candidate[AnyDeployment]]) -> tuple[ir.FrontierPoint, ...]:
    """The Pareto frontier the search kept (decode or aggregated, plus the best prefill of each size),
    the other mode's best (so a plan shows both modes side by side), and the chosen point of each phase.

    The chosen decode point need not lie on the per-device frontier: the split between phases
    maximises requests/s of the whole slice, which can prefer a smaller instance.
    """
    chosen = {c.deployment for c in final.values()}
    seen: set = set()
    points = []

    def add(c: Candidate[AnyDeployment], is_chosen: bool) -> None:
        if c.deployment in seen:
            return
        seen.add(c.deployment)
        points.append(frontier_point(c, is_chosen))

    for other in sr.modes[1:]:
        for best in (other.prefill, other.decode):
            if best is not None and best.deployment not in chosen:
                add(best, False)
    searched = {sr.decode.deployment, getattr(sr.prefill, "deployment", None)}
    for point in sr.frontier:
        if point.deployment not in chosen and point.deployment not in searched:
            add(point, False)
    for name in ("prefill", "decode"):
        if name in final:
            add(final[name], True)
    return tuple(points)


# --- the stage table: the stage-split pass pipeline's stages and measured cuts as Plan IR records ---
#
# `podplan compile` and `podplan trace` both read stage facts from here, so a pass added to the
# pipeline changes what they show; nothing re-derives a stage's params, FLOPs or bytes by formula.

# The signature the compiler traces: one 128-token prompt (the attention FLOPs per token depend on
# it through the causal mean KV length; every other stage fact is per token and does not).
STAGE_BATCH = 1
STAGE_SEQ = 128


@dataclass(frozen=True)
class StageTable:
    """What the pipeline produced, in the plan's terms."""

    stages: tuple[ir.Stage, ...]
    passes: tuple[str, ...]  # in the order they ran
    program: StagedProgram


def stage_table(traced: Traced, shape: ModelShape, batch: int = STAGE_BATCH, seq: int = STAGE_SEQ) -> StageTable:
    """Run the registered stage-split pipeline (passes.PIPELINES) through the PassManager."""
    program = compile_stages(traced, shape, batch, seq)
    return StageTable(plan_stages(program), tuple(r.name for r in program.records), program)


def plan_stages(program: StagedProgram) -> tuple[ir.Stage, ...]:
    """One ir.Stage per stage of the staged program, in program order, with its inputs by producer."""
    rows = stage_rows(program)
    order = {row["stage"]: i for i, row in enumerate(rows)}
    # (dst, src) -> [kinds, bf16, int8], summed over the values crossing that edge
    edges: dict[tuple[str, str], list] = {}
    for cut in program.cuts:
        if cut.kind not in TRAFFIC_KINDS:
            continue
        edge = edges.setdefault((cut.dst, cut.src), [set(), 0.0, 0.0])
        edge[0].add(cut.kind)
        edge[1] += cut.bytes_bf16
        edge[2] += cut.bytes_int8
    inputs: dict[str, tuple[ir.StageInput, ...]] = {}
    for (dst, src), (kinds, bf16, int8) in sorted(edges.items(), key=lambda e: (order[e[0][0]], order[e[0][1]])):
        inputs[dst] = (*inputs.get(dst, ()), ir.StageInput(src=src, kinds=tuple(sorted(kinds)), bytes_per_token=bf16,
                                                           bytes_per_token_int8=int8))
    out_bf16: dict[str, float] = {}
    out_int8: dict[str, float] = {}
    for ins in inputs.values():
        for i in ins:
            out_bf16[i.src] = out_bf16.get(i.src, 0.0) + i.bytes_per_token
            out_int8[i.src] = out_int8.get(i.src, 0.0) + i.bytes_per_token_int8
    stages = []
    for row in rows:
        name = row["stage"]
        ins = inputs.get(name, ())
        stages.append(ir.Stage(
            name=name, layer=row["layer"], kind=row["kind"], params=row["params"], weight_bytes=row["weight_bytes"],
            flops_per_token=row["flops_per_token"],
            bytes_in_per_token=sum(i.bytes_per_token for i in ins),
            bytes_out_per_token=out_bf16.get(name, 0.0),
            bytes_in_per_token_int8=sum(i.bytes_per_token_int8 for i in ins),
            bytes_out_per_token_int8=out_int8.get(name, 0.0),
            inputs=ins,
        ))
    return tuple(stages)


# Decode candidates `--rate` simulates: the best by the search's own objective (requests/s of the split).
RATE_CANDIDATES = 4


def _choose_for_rate(sr: SearchResult, shape: ModelShape, topo: Topology, wl: ir.Workload, rate: float,
                     seed: int) -> tuple[SearchResult, ir.SolverRun]:
    """The search result with the decode deployment (of the chosen one and the frontier's) whose fleet
    has the most simulated goodput at `rate` (docs/simulate.md)."""
    from planner.search import split_devices
    from planner.simulate.choose import best_for_rate, fleet_of_deployments

    from costmodels.serving import DecodeDeployment

    options = []
    assert sr.prefill is not None  # compile_report refuses --rate for an aggregated choice
    decode: list[Candidate[DecodeDeployment]] = [
        c for c in (sr.decode, *sr.frontier) if isinstance(c.deployment, DecodeDeployment)]  # type: ignore[misc]
    for c in {c.deployment: c for c in decode}.values():
        nd, np_, req = split_devices(sr.slice, c, sr.prefill, wl)
        if nd:
            options.append((round(req, 6), round(c.tput, 6), c, nd, np_))
    options.sort(key=lambda o: o[:2], reverse=True)  # stable: ties keep the search's order
    top = options[:RATE_CANDIDATES]
    fleets = [fleet_of_deployments(shape, topo, wl, sr.prefill.deployment, np_, c.deployment, nd)
              for _, _, c, nd, np_ in top]
    i, scores = best_for_rate(fleets, rate, seed)
    req, _, c, nd, np_ = top[i]
    run = ir.SolverRun(name=f"simulate {len(top)} decode candidates at {rate:g} req/s", solver="simulate",
                       status="BEST_GOODPUT", objective=scores[i]["goodput"])
    return replace(sr, decode=c, decode_instances=nd, prefill_instances=np_, requests_per_s=req), run


def search_record(sr: SearchResult, wl: ir.Workload, imb: Imbalance) -> ir.SearchRecord:
    """The plan's record of the search: each mode's best (as the search scored it) or why it has none."""
    modes = []
    for r in sr.modes:
        if not r.ok:
            modes.append(ir.ModeChoice(mode=r.mode, refused=r.error))  # type: ignore[arg-type]
            continue
        s = r.summary(wl, sr.slice.devices)
        modes.append(ir.ModeChoice(
            mode=r.mode, chosen=r is sr.modes[0], requests_per_s=r.requests_per_s,  # type: ignore[arg-type]
            output_tokens_per_s_per_device=s["output_tokens_per_s_per_device"], tpot_ms=s["tpot_ms"],
            ttft_ms=s["ttft_ms"], devices=r.devices_used, config=mode_config(r)))
    scored = {"decode": imb.of("decode", sr.decode.expert_devices)}
    if sr.prefill is not None:
        scored["prefill"] = imb.of("prefill", sr.prefill.expert_devices)
    return ir.SearchRecord(modes=tuple(modes), why=sr.why, devices=sr.slice.devices, imbalance=scored,
                           notes=sr.notes)


def mode_config(r: ModeResult) -> str:
    """'N x <prefill config>; M x <decode config>': one mode's best deployment in one line."""
    assert r.decode is not None
    line = f"{r.decode_instances} x {config_line(r.decode)}"
    if r.prefill is not None:
        line = f"{r.prefill_instances} x {config_line(r.prefill)}; {line}"
    return line


# How many times the compiler searches again at the balancer's imbalance (each pass can pick another
# instance shape, whose balance differs a little; two settle every bundled model).
RESEARCHES = 3


def _imbalance(res: BalanceResult) -> float:
    """The imbalance a phase runs at: the mean over layers of max/mean load (layers run in sequence)."""
    return max(1.0, float(np.mean(res.max_over_mean)))


def _slo_misses(phases: list[_PhasePlan], wl: ir.Workload) -> list[str]:
    """'TPOT 50.4 ms > 50' for each latency target the balanced plan misses."""
    out = []
    for pp in phases:
        est = pp.cand.estimate
        if wl.tpot_slo_ms is not None and est.tpot_ms is not None and est.tpot_ms > wl.tpot_slo_ms:
            out.append(f"TPOT {est.tpot_ms:.2f} ms > {wl.tpot_slo_ms:g}")
        if wl.ttft_slo_ms is not None and est.ttft_ms is not None and est.ttft_ms > wl.ttft_slo_ms:
            out.append(f"TTFT {est.ttft_ms:.0f} ms > {wl.ttft_slo_ms:g}")
    return out


# What one search + balance gives: the search, its phases re-scored once balanced, the balancer's results
# by phase, and the --rate simulation's record (None without --rate).
_Searched = tuple[SearchResult, list[_PhasePlan], dict[str, BalanceResult], ir.SolverRun | None]


def _search_and_balance(shape: ModelShape, topo: Topology, opts: CompileOptions, loads: np.ndarray,
                        imb: Imbalance, say: Callable[[str], None]) -> _Searched:
    """Search at `imb`, then balance each chosen phase and re-score it at the imbalance reached."""
    wl = opts.workload
    say(f"searching deployments on {topo.name}")
    sr = search(shape, topo, wl, opts.pins, mode=opts.mode, devices=opts.devices, imbalance=imb)
    chosen_for_rate: ir.SolverRun | None = None
    if opts.rate is not None:
        if sr.prefill is None:
            raise InputError(f"--rate {opts.rate:g}: the search chose aggregated serving, and --rate chooses among "
                             "disaggregated deployments; add --mode disagg (or drop --rate)")
        say(f"simulating the top decode candidates at {opts.rate:g} req/s")
        sr, chosen_for_rate = _choose_for_rate(sr, shape, topo, wl, opts.rate, opts.seed)
    # an aggregated plan has one phase, "decode", whose instances also run prefill (chunked into the
    # decode steps): the runtime and the exporters run a one-phase plan's instances for both phases
    phases = [_phase_plan("decode", sr.decode, sr.decode_instances, shape, topo)]
    if sr.prefill is not None:
        phases.insert(0, _phase_plan("prefill", sr.prefill, sr.prefill_instances, shape, topo))

    slots = place(topo, [r for pp in phases for r in _requests(pp)], devices=opts.devices)
    balances: dict[str, BalanceResult] = {}  # by phase name
    for pp in phases:
        pp.slots_of = [s for s in slots if s.id.startswith(pp.name + "-")]
        say(f"balancing {shape.num_moe_layers} layers for {pp.name}: {pp.routed} devices x {pp.slots} slots")
        res = balance(loads, pp.routed, pp.slots, nodes=1, algorithm="ilp", split=opts.split,
                      time_limit=opts.time_limit, seed=opts.seed)
        balances[pp.name] = res
        # re-score with the imbalance the balancer reached
        pp.cand = rescore(pp.cand, shape, topo, _imbalance(res), pp.redundant)
    return sr, phases, balances, chosen_for_rate


def compile_plan(model: str, topology: str, opts: CompileOptions,
                 progress: Callable[[str], None] | None = None) -> ir.Plan:
    """Run the whole pipeline and return the plan (nothing is written)."""
    return compile_report(model, topology, opts, progress)[0]


def compile_report(model: str, topology: str, opts: CompileOptions,
                   progress: Callable[[str], None] | None = None) -> tuple[ir.Plan, SearchResult]:
    """The plan and the search behind it (both modes' best, why the winner won, idle devices)."""
    say = progress or (lambda _msg: None)
    _validate(opts)
    topo = get_topology(topology)
    if not topo.hardware.supports_weights(opts.workload.quant):
        from costmodels.compute import QUANTS

        ok = ", ".join(q for q in QUANTS if topo.hardware.supports_weights(q))
        raise InputError(f"--quant {opts.workload.quant}: {topo.hardware.name} ({topo.name}) does not support it; "
                         f"use one of {ok}")
    say(f"tracing {model}")
    traced = trace(model)
    shape = shape_from_traced(traced)
    say(f"running the stage-split pass pipeline on {model}")
    table = stage_table(traced, shape)  # Plan.stages: the pipeline's stages and measured cuts
    loads = read_loads(opts.loads, layers=shape.num_moe_layers, experts=shape.num_routed_experts, seed=opts.seed)

    wl = opts.workload
    imb = Imbalance()
    state = _search_and_balance(shape, topo, opts, loads, imb, say)
    researches: list[ir.SolverRun] = []
    first_miss = unmet = ""
    meeting: tuple[Imbalance, _Searched] | None = None  # the last plan that met the targets once balanced
    # Step: the search scores candidates at perfect expert balance; the balancer's placement rarely
    # reaches it, so the balanced plan can miss the TPOT/TTFT target the search honoured. Then search
    # again, scoring the shapes balanced so far at what the balancer reached and the others at the
    # worst of those (docs/compile.md step 4). A plan that meets the targets but was scored at a worse
    # imbalance than its shape reached gets one more search at the learnt value, kept only if it
    # also meets them once balanced.
    for _ in range(RESEARCHES):
        sr, phases, balances, _rate = state
        missed = _slo_misses(phases, wl)
        learned, pessimistic = imb, False
        for pp in phases:  # an aggregated plan's one phase is "decode"
            key, n = ("prefill" if pp.name == "prefill" else "decode"), pp.cand.expert_devices
            reached = _imbalance(balances[pp.name])
            pessimistic |= reached < imb.of(key, n) - 1e-9
            learned = learned.learn(key, n, reached)
        if not missed:
            meeting = (imb, state)
            if not researches or not pessimistic:
                break
        if learned == imb:
            break
        say(f"{'; '.join(missed) or 'scored pessimistically'} after expert balancing: searching again at "
            f"imbalance {learned.describe()}")
        try:
            again = _search_and_balance(shape, topo, opts, loads, learned, say)
        except InfeasibleError as exc:  # keep the plan, and say what it misses and why nothing else meets it
            if missed:
                unmet = f"{'; '.join(missed)} once balanced, and at imbalance {learned.describe()}: {exc}"
            break
        imb, state = learned, again
        first_miss = first_miss or "; ".join(missed)
        researches.append(ir.SolverRun(
            name=f"search again at expert imbalance {imb.describe()} ({again[0].mode}): balanced plan had "
                 f"{'; '.join(missed) or 'met the targets, scored pessimistically'}",
            solver="enumerate", status="EXHAUSTIVE", objective=round(again[0].requests_per_s, 6)))
    if meeting is not None and _slo_misses(state[1], wl):  # the improvement missed: back to the plan that met
        imb, state = meeting
    sr, phases, balances, chosen_for_rate = state
    if researches:  # the summary says why the chosen plan is not the first search's
        sr = replace(sr, notes=(*sr.notes, f"the first choice had {first_miss} once balanced: searched again at "
                                           f"expert imbalance {imb.describe()}"))
    if unmet:
        sr = replace(sr, notes=(*sr.notes, unmet))

    weight_bytes = dtype_bytes(wl.quant)
    dies = topo.dies_per_device
    phase_ir = {}
    for pp in phases:
        est = pp.cand.estimate
        phase_ir[pp.name] = ir.Phase(
            instances=_instances(pp, topo, shape.num_shared_experts > 0 and shape.params_shared > 0), experts=(_placement(balances[pp.name], shape.moe_layers),),
            predictions=prediction_of(est), memory=memory_of(est, pp.mode, dies),
        )
    frontier = _frontier(sr, {pp.name: pp.cand for pp in phases})
    topo_info = ir.TopologyInfo.from_topology(topo)
    record = search_record(sr, wl, imb)
    plan = ir.Plan(
        schema_version=ir.version_needed(topo_info, record),
        model=ir.ModelInfo.from_shape(shape, traced.source.digest(), weight_bytes),
        topology=topo_info,
        workload=wl,
        stages=table.stages,
        provenance=ir.Provenance(podplan_version=__version__, seed=opts.seed,
                                 options=dict(opts.to_dict(), model=model, topology=topology),
                                 solvers=_solver_runs(sr, phases, balances, shape.moe_layers)
                                 + tuple(researches) + ((chosen_for_rate,) if chosen_for_rate else ()),
                                 passes=table.passes),
        prefill=phase_ir.get("prefill"), decode=phase_ir["decode"], frontier=frontier,
        search=record,
    )
    return plan, sr
