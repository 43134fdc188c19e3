"""Synthetic but valid plans built without the compiler: for tests, the runtime and the plan views.

Shapes and topologies are real (zoo config, costmodels topology) and the stages are the model's stage
table from the stage-split pass pipeline (what `podplan compile` records); expert loads are seeded
Zipf, placement is EPLB, and predictions/memory are round illustrative numbers, not cost-model output.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from costmodels import opcount
from costmodels.errors import InputError
from costmodels.hardware import DTYPE_BYTES
from costmodels.model_shape import ModelShape
from costmodels.topology import get_topology
from planner import __version__
from planner.balance.eplb import eplb
from planner.ir.plan import (
    ExpertPlacement,
    FrontierPoint,
    Instance,
    LayerPlacement,
    MemoryUse,
    Mode,
    ModelInfo,
    Phase,
    PhaseName,
    Plan,
    Prediction,
    Provenance,
    SolverRun,
    TopologyInfo,
    Workload,
    expert_parallel_dies,
)
from planner.frontend.shape import shape_from_traced, shape_of
from planner.frontend.trace import trace
from planner.frontend.zoo import load_source
from planner.compile import StageTable, stage_table

# Redundant slots beyond one per expert: 1/8 more, as CloudMatrix-Infer prefill (9 slots per die for
# 8 routed experts, CMI) and decode (288 routed slots over 256 experts).
REDUNDANCY = 9 / 8
# Tokens per step the synthetic loads sum to, per MoE layer (only ratios matter).
TOKENS_PER_STEP = 16384


def synthetic_plan(model: str = "tiny-mixtral", topology: str = "local:8", *, prefill_instances: int = 1,
                   prefill_devices: int = 2, decode_devices: int | None = None, decode_mode: Mode = "colocated",
                   attention_devices: int | None = None, slots_per_device: int | None = None,
                   weighted: bool = False, microbatches: int = 1, dp_domains: int = 1, quant: str = "bf16",
                   mtp_accept: float = 0.0, shared_pd: bool = False, skew: float = 1.2, seed: int = 0) -> Plan:
    """A valid plan for `model` on `topology`: prefill instances first, then one decode instance.

    prefill_devices: devices per prefill instance (0 = no prefill phase); decode_devices: the decode
    instance's devices (None = every device left, 0 = no decode phase); decode_mode "disaggregated"
    puts attention on the first `attention_devices` of it (default half) and experts on the rest.
    shared_pd: one prefill instance on the decode instance's devices (no KV hand-over between devices).
    """
    src = load_source(model)
    shape = shape_of(model)
    table = _stage_table(model)
    topo = get_topology(topology)
    tinfo = TopologyInfo.from_topology(topo)
    wb = DTYPE_BYTES[quant]
    rng = np.random.default_rng(seed)
    used = prefill_instances * prefill_devices if prefill_devices and not shared_pd else 0
    if decode_devices is None:
        decode_devices = tinfo.num_devices - used
    if decode_devices < 0 or used + decode_devices > tinfo.num_devices or used + decode_devices == 0:
        raise InputError(f"synthetic_plan: {used} prefill + {decode_devices} decode devices do not fit "
                         f"{topology} ({tinfo.num_devices} devices)")
    solvers: list[SolverRun] = []
    prefill = None
    if shared_pd:
        prefill_instances, prefill_devices = 1, decode_devices
    if prefill_devices:
        spd = slots_per_device or _slots(shape.num_routed_experts, prefill_devices)
        placement = _placement(shape, prefill_devices, spd, weighted, skew, rng, solvers, "prefill")
        instances = []
        for i in range(prefill_instances):
            devs = tuple(range(i * prefill_devices, (i + 1) * prefill_devices))  # shared_pd: used == 0
            instances.append(_instance(f"prefill-{i}", "colocated", devs, devs, tinfo, shape, microbatches,
                                       float(min(16384, 64 * shape.hidden)), 1))
        prefill = _phase("prefill", tuple(instances), placement, shape, tinfo, wb, spd)
    decode = None
    if decode_devices:
        devs = tuple(range(used, used + decode_devices))
        if decode_mode == "disaggregated":
            n_attn = attention_devices or max(1, decode_devices // 2)
            if not 0 < n_attn < decode_devices:
                raise InputError(f"synthetic_plan: attention_devices must be 1..{decode_devices - 1}")
            attn, experts = devs[:n_attn], devs[n_attn:]
        else:
            attn = experts = devs
        spd = slots_per_device or _slots(shape.num_routed_experts, len(experts))
        placement = _placement(shape, len(experts), spd, weighted, skew, rng, solvers, "decode")
        inst = _instance("decode-0", decode_mode, attn, experts, tinfo, shape, microbatches,
                         96.0 if shape.hidden >= 1024 else 4.0, dp_domains)
        decode = _phase("decode", (inst,), placement, shape, tinfo, wb, spd, mtp_accept)
    options = {"generator": "tests.plan_factory.synthetic_plan", "model": model, "topology": topology,
               "quant": quant, "weighted": weighted, "skew": skew, "decode_mode": decode_mode, "shared_pd": shared_pd}
    return Plan(
        model=ModelInfo.from_shape(shape, src.digest(), wb),
        topology=tinfo,
        workload=Workload(input_len=4096 if shape.hidden >= 1024 else 64, output_len=1024 if shape.hidden >= 1024 else 16,
                          quant=quant, mtp_accept=mtp_accept, tpot_slo_ms=50.0, ttft_slo_ms=2000.0),
        stages=table.stages,
        provenance=Provenance(podplan_version=__version__, seed=seed, options=options, solvers=tuple(solvers),
                              passes=table.passes),
        prefill=prefill,
        decode=decode,
        frontier=_frontier(prefill, decode),
    )


def tiny_plan(model: str = "tiny-mixtral", **kwargs) -> Plan:
    """A small plan on local:8: one 2-device prefill instance and a 6-device decode instance."""
    return synthetic_plan(model, "local:8", **kwargs)


def aggregated_plan(model: str = "tiny-mixtral", topology: str = "local:8", *, decode_devices: int | None = None,
                    **kwargs) -> Plan:
    """An aggregated plan (`podplan compile --mode agg`): one phase, decode, whose instance also runs prefill,
    a chunk of prompt tokens in every step. The chunk is costmodels.aggregated's (admits requests as fast as
    decode finishes them); its time (a quarter of the decode step), TTFT and the frontier are illustrative.
    The frontier holds aggregated points around the chosen one and one decode-only point of the
    disaggregated mode, as a compiled plan's does."""
    plan = synthetic_plan(model, topology, prefill_devices=0, decode_devices=decode_devices, **kwargs)
    assert plan.decode is not None
    wl, inst, p = plan.workload, plan.decode.instances[0], plan.decode.predictions
    assert p.step_ms is not None and p.tpot_ms is not None
    chunk = inst.batch_per_device * (1 + wl.mtp_accept) * wl.input_len / wl.output_len  # tokens per device
    step = p.step_ms * 1.25
    dies = plan.topology.dies_per_device
    ttft = math.ceil(wl.input_len / (chunk / dies)) * step
    tokens = inst.batch_per_device * len(inst.attention_devices) * (1 + wl.mtp_accept)
    pred = Prediction(step_ms=step, throughput_per_device=tokens / len(inst.devices) * 1000.0 / step,
                      breakdown={**p.breakdown, "prefill_chunk": step - p.step_ms},
                      tpot_ms=step / (1 + wl.mtp_accept), ttft_ms=ttft)
    points = []
    for f in (0.5, 1.0, 1.6):
        points.append(FrontierPoint(
            phase="decode", throughput_per_device=pred.throughput_per_device * f ** 0.6, tpot_ms=pred.tpot_ms * f,
            ttft_ms=ttft / f, chosen=f == 1.0,
            config=f"aggregated {len(inst.devices)} dev, batch {inst.batch_per_device * f:g}, "
                   f"chunk {chunk * f:g} tok/dev, mb {inst.microbatches}"))
    # the disaggregated mode's best decode: more tokens per device, as it leaves its prefill devices out
    points.append(FrontierPoint(phase="decode", throughput_per_device=pred.throughput_per_device * 1.1,
                                tpot_ms=pred.tpot_ms * 0.9, config=f"colocated 2 dev, batch {inst.batch_per_device:g}, mb 1"))
    decode = dataclasses.replace(plan.decode, predictions=pred)
    return dataclasses.replace(plan, decode=decode, frontier=tuple(points))


def deepseek_v3_plan(decode_mode: Mode = "colocated", **kwargs) -> Plan:
    """DeepSeek-V3 on cloudmatrix384 shaped like CloudMatrix-Infer (arXiv 2506.12708): 6 x 16-NPU prefill
    instances and a 160-NPU decode instance (colocated), or 288 decode NPUs split attention/experts."""
    decode = 160 if decode_mode == "colocated" else 288
    kwargs.setdefault("attention_devices", 160 if decode_mode == "disaggregated" else None)
    return synthetic_plan("deepseek-v3", "cloudmatrix384", prefill_instances=6, prefill_devices=16,
                          decode_devices=decode, decode_mode=decode_mode, quant="int8", mtp_accept=0.7,
                          microbatches=2, **kwargs)


# --- pieces -------------------------------------------------------------------------------------


def _slots(experts: int, devices: int) -> int:
    return max(1, math.ceil(experts * REDUNDANCY / devices))


def _instance(iid: str, mode: Mode, attn: tuple[int, ...], experts: tuple[int, ...], t: TopologyInfo,
              shape: ModelShape, microbatches: int, batch: float, dp_domains: int) -> Instance:
    devices = tuple(sorted(set(attn) | set(experts)))
    shared = experts if shape.num_shared_experts else ()
    return Instance(
        id=iid, mode=mode, devices=devices, attention_devices=attn, expert_devices=experts,
        attention_dp=len(attn) * t.dies_per_device, attention_tp=1,
        ep=expert_parallel_dies(experts, shared, t.dies_per_device),
        microbatches=microbatches, batch_per_device=batch, experts=0, dp_domains=dp_domains,
        shared_expert_devices=shared,
    )


def _placement(shape: ModelShape, devices: int, spd: int, weighted: bool, skew: float, rng: np.random.Generator,
               solvers: list[SolverRun], phase: str) -> ExpertPlacement:
    """EPLB over seeded Zipf loads; weighted shares drawn at random (valid, not optimised)."""
    E, L = shape.num_routed_experts, shape.num_moe_layers
    ranks = np.arange(1, E + 1, dtype=np.float64)
    load = np.stack([rng.permutation(ranks ** -skew) for _ in range(L)])
    load = load / load.sum(axis=1, keepdims=True) * TOKENS_PER_STEP
    result = eplb(load, devices * spd, 1, 1, devices)
    layers, worst = [], 1.0
    for i, layer in enumerate(shape.moe_layers):
        phy2log = result.phy2log[i]
        count = np.bincount(phy2log, minlength=E)
        if weighted:
            raw = rng.uniform(0.5, 1.5, size=phy2log.shape[0])
            shares = raw / np.bincount(phy2log, weights=raw, minlength=E)[phy2log]
        else:
            shares = 1.0 / count[phy2log]
        slot_load = load[i][phy2log] * shares
        device_loads = slot_load.reshape(devices, spd).sum(axis=1)
        worst = max(worst, float(device_loads.max() / device_loads.mean()))
        layers.append(LayerPlacement(layer=layer, phy2log=phy2log, shares=shares if weighted else None,
                                     device_loads=device_loads))
    solvers.append(SolverRun(name=f"balance {phase}", solver="eplb", status="HEURISTIC", objective=worst,
                             bound=1.0, gap=(worst - 1.0) / worst))
    return ExpertPlacement(devices=devices, slots_per_device=spd, layers=tuple(layers), algorithm="eplb")


def _phase(name: str, instances: tuple[Instance, ...], placement: ExpertPlacement, shape: ModelShape,
           t: TopologyInfo, wb: float, spd: int, mtp_accept: float = 0.0) -> Phase:
    inst = instances[0]
    big = shape.hidden >= 1024
    # Illustrative step times: CloudMatrix-Infer's decode (TPOT ~50 ms, CMI Table 3) for big
    # models, a few ms for the tiny ones on CPU processes.
    step = (49.4 * (1 + mtp_accept) if name == "decode" else 1200.0) if big else (3.0 if name == "decode" else 8.0)
    breakdown = _breakdown(step, shape, inst.mode)
    cap = t.memory_gb_per_device
    dense_gb = (shape.params_total - shape.num_routed_experts * shape.params_expert * shape.num_moe_layers) * wb / 1e9
    expert_gb = spd * shape.params_expert * shape.num_moe_layers * wb / 1e9
    kv_gb = inst.batch_per_device * 4096 * opcount.kv_bytes_per_token(shape, 2.0) / 1e9 if name == "decode" else 2.0
    work_gb = 0.65 * t.dies_per_device  # CloudMatrix-Infer's ~645 MB static buffers per die (CMI)
    if not big:
        kv_gb, work_gb = kv_gb / 1e3, 0.01
    memory = {}
    if inst.mode == "colocated":
        memory["both"] = _memory(dense_gb + expert_gb, kv_gb, work_gb, cap)
    else:
        memory["attention"] = _memory(dense_gb, kv_gb, work_gb, cap)
        memory["experts"] = _memory(expert_gb, 0.0, work_gb, cap)
    devices = len(inst.devices)
    if name == "decode":
        seqs = inst.batch_per_device * len(inst.attention_devices)
        tpot = step / (1 + mtp_accept)
        pred = Prediction(step_ms=step, throughput_per_device=seqs / devices * 1000.0 / tpot, breakdown=breakdown,
                          tpot_ms=tpot)
    else:
        pred = Prediction(step_ms=step, throughput_per_device=inst.batch_per_device * 1000.0 / step,
                          breakdown=breakdown, ttft_ms=step)
    fits = all(m.feasible for m in memory.values())
    if not fits:
        pred = Prediction(step_ms=pred.step_ms, throughput_per_device=pred.throughput_per_device,
                          breakdown=pred.breakdown, tpot_ms=pred.tpot_ms, ttft_ms=pred.ttft_ms, feasible=False,
                          infeasible_reason="memory: a device role exceeds its capacity")
    return Phase(instances=instances, experts=(placement,), predictions=pred, memory=memory)


def _memory(weights: float, kv: float, workspace: float, cap: float) -> MemoryUse:
    return MemoryUse(used_gb=weights + kv + workspace, capacity_gb=cap,
                     breakdown={"weights": weights, "kv": kv, "workspace": workspace})


def _breakdown(step: float, shape: ModelShape, mode: str) -> dict[str, float]:
    # Shares of a decode step in CloudMatrix-Infer's profile order of magnitude: attention and
    # the MoE path dominate, communication about a quarter.
    parts = {"attention": 0.34, "gate": 0.02, "dispatch": 0.12, "experts": 0.28, "combine": 0.12,
             "shared_experts": 0.06 if shape.num_shared_experts else 0.0, "other": 0.04}
    parts["scheduling"] = 1.0 - sum(parts.values())
    return {k: step * v for k, v in parts.items()}


@functools.lru_cache(maxsize=None)
def _stage_table(model: str) -> StageTable:
    """The model's stage table from the stage-split pass pipeline, as `podplan compile` builds it
    (once per model and test process: DeepSeek-V3 takes a few seconds on meta)."""
    traced = trace(model)
    return stage_table(traced, shape_from_traced(traced))


def _frontier(prefill: Phase | None, decode: Phase | None) -> tuple[FrontierPoint, ...]:
    """The chosen point of each phase plus neighbours trading TPOT for throughput."""
    points = []
    phases: tuple[tuple[PhaseName, Phase | None], ...] = (("prefill", prefill), ("decode", decode))
    for name, phase in phases:
        if phase is None:
            continue
        p, inst = phase.predictions, phase.instances[0]
        for k, f in enumerate((0.5, 0.75, 1.0, 1.25, 1.6)):
            # bigger batches: higher TPOT, throughput rising sub-linearly
            tput = p.throughput_per_device * f ** 0.6
            base = f"{inst.mode} EP{inst.ep} DP{inst.attention_dp} TP{inst.attention_tp}"
            points.append(FrontierPoint(
                phase=name, throughput_per_device=tput, config=f"{base} batch {inst.batch_per_device * f:g}",
                tpot_ms=p.tpot_ms * f if p.tpot_ms is not None else None,
                ttft_ms=p.ttft_ms * f if p.ttft_ms is not None else None,
                feasible=f <= 1.25, chosen=f == 1.0,
            ))
    return tuple(points)
