"""Re-plan a plan after device failures or a load shift, moving as few expert replicas as possible.

`replan(plan, failed=..., loads=...)` drops failed devices from their instances, re-solves the
expert placement of every affected instance shape, re-estimates predictions with the cost model and
keeps the rest of the plan. Steps are numbered as in docs/replan.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Sequence

import numpy as np

from costmodels.errors import InfeasibleError, InputError
from planner.ir import plan as ir
from planner.balance.balancer import balance
from planner.balance.migrate import migrate, moved_slots
from planner.balance.loads import is_generator, read_loads

if TYPE_CHECKING:
    from costmodels.model_shape import ModelShape
    from costmodels.serving import Estimate
    from costmodels.topology import Topology

# Default tolerance on a re-solved layer: keep the layout with the fewest moved slots whose max
# device load is within this fraction of the from-scratch solve on the surviving devices. The
# acceptance bar is 2 %; 1.5 % leaves room for the weighted-split LP's rounding.
DEFAULT_SLACK = 0.015


@dataclass(frozen=True)
class PlacementChange:
    """One re-solved expert placement: which instances use it, what moved, balance before and after.

    Balances are max / mean device load (1.0 = perfect): `*_before` of the old layout on the old
    devices, `*_after` of the new one, `scratch_*` of a from-scratch solve on the surviving devices
    (its moved slots count that layout deployed as solved, device i on surviving device i).
    """

    phase: str
    instances: tuple[str, ...]
    devices_before: int
    devices_after: int
    slots_per_device: int
    moved_slots: int
    lost_slots: int
    migration_bytes: int
    balance_before: float
    balance_after: float
    worst_before: float
    worst_after: float
    scratch_balance: float
    scratch_worst: float
    scratch_moved: int
    repaired_layers: int
    layers: int


@dataclass(frozen=True)
class ReplanResult:
    """The new plan, the re-solved placements, the failed devices and notes for the user."""

    plan: ir.Plan
    changes: tuple[PlacementChange, ...]
    failed: tuple[int, ...]
    notes: tuple[str, ...]


def parse_device_ids(text: str, num_devices: int, topology: str = "the topology") -> tuple[int, ...]:
    """'3,17,40-47' -> (3, 17, 40, ..., 47), each id checked against 0..num_devices-1."""
    ids: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise InputError(f"--failed-devices {text!r}: {part!r} is not a device id or a range like 40-47") from None
        if first > last:
            raise InputError(f"--failed-devices {text!r}: range {part!r} runs backwards; write it low-high")
        for d in (first, last):
            if not 0 <= d < num_devices:
                raise InputError(
                    f"--failed-devices {text!r}: device {d} out of range 0..{num_devices - 1} of {topology}")
        ids.update(range(first, last + 1))
    if not ids:
        raise InputError(f"--failed-devices {text!r}: no device ids; write them like 3,17,40-47")
    return tuple(sorted(ids))


def plan_loads(plan: ir.Plan, spec: str | None, seed: int | None = None) -> np.ndarray:
    """Expert loads [MoE layers, experts]: `spec` (file or generator), else the ones the plan was compiled with."""
    m = plan.model
    layers, experts = len(m.moe_layers), m.num_routed_experts
    if spec is not None:
        return read_loads(spec, layers=layers, experts=experts, seed=plan.provenance.seed if seed is None else seed)
    # the latest loads a replan applied (with its seed), else the compile's
    compiled, seed = plan.provenance.options.get("loads"), plan.provenance.seed
    replans = plan.provenance.options.get("replans", ())
    for i, record in enumerate(replans if isinstance(replans, (list, tuple)) else ()):
        if isinstance(record, dict) and isinstance(record.get("loads"), str):
            compiled, seed = record["loads"], _recorded_seed(record.get("seed", seed), i)
    if not isinstance(compiled, str):
        raise InputError("replan: the plan does not record the expert loads it was compiled with; pass --loads FILE")
    if not is_generator(compiled):
        # A plan names its loads; it does not choose files for podplan to open (plans are shared).
        raise InputError(f"replan: the plan was made with loads from a file ({compiled[:80]!r}); podplan does not "
                         "open files a plan names: pass it yourself with --loads FILE")
    try:
        return read_loads(compiled, layers=layers, experts=experts, seed=seed)
    except InputError as exc:
        raise InputError(f"replan: cannot re-read the plan's loads ({exc}); pass --loads FILE") from None


def _recorded_seed(value: object, i: int) -> int:
    """The seed a replan record holds, as the generators take it: an integer in 0..2**32-1."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
        raise InputError(f"replan: plan.provenance.options.replans[{i}].seed: {value!r} is not a seed in "
                         "0..4294967295; pass --loads to choose the loads yourself")
    return value


def replan(
    plan: ir.Plan,
    *,
    failed: Sequence[int] = (),
    loads: np.ndarray | None = None,
    phases: Sequence[str] | None = None,
    time_limit: float = 0.5,
    seed: int = 0,
    slack: float = DEFAULT_SLACK,
    workers: int | None = None,
    estimate: bool = True,
    loads_spec: str | None = None,
    model_config: str | None = None,
) -> ReplanResult:
    """Re-solve the placements touched by `failed` devices (and all of `phases` when `loads` is new).

    loads: [MoE layers, experts] tokens per step; None re-reads the plan's own (failures only).
    phases: where new loads apply (default: every phase). slack: see DEFAULT_SLACK. loads_spec: the
    file or generator `loads` came from, recorded so a later replan re-reads it (generators only).
    model_config: the config file of a plan compiled from a user's config, to re-estimate predictions
    (a plan's own paths are never opened).
    """
    if not math.isfinite(slack) or slack < 0:
        raise InputError(f"replan: migration slack must be >= 0 (got {slack})")
    if time_limit <= 0:
        raise InputError(f"replan: --time-limit {time_limit}: must be > 0 seconds")
    failed_set = set(int(d) for d in failed)
    shifted = set(plan.phases if phases is None else phases) if loads is not None else set()
    for name in shifted:
        if name not in plan.phases:
            raise InputError(f"replan: the plan has no {name} phase; use one of {', '.join(plan.phases)}")
    used = {d for _, inst in plan.instances() for d in inst.devices}
    idle = sorted(failed_set - used)
    notes = []
    if idle:
        notes.append(f"devices {ir.device_ranges(idle)} are idle in the plan: nothing runs there to re-plan")
    if not (failed_set & used) and not shifted:
        raise InputError("replan: nothing to re-plan: no failed device is in use and no --loads was given")
    if loads is None and failed_set & used:
        loads = plan_loads(plan, None)

    new_phases: dict[str, ir.Phase] = {}
    changes: list[PlacementChange] = []
    for name, phase in plan.phases.items():
        touched = any(failed_set & set(inst.devices) for inst in phase.instances)
        if not touched and name not in shifted:
            new_phases[name] = phase
            continue
        phase_new, phase_changes = _replan_phase(plan, name, phase, failed_set, loads, name in shifted,
                                                 time_limit, seed, slack, workers)
        changes += phase_changes
        new_phases[name] = phase_new

    # Step 5: predictions of the changed phases, with the imbalance each instance now has.
    if estimate:
        for name in sorted(new_phases):
            if new_phases[name] is plan.phases[name]:
                continue
            new_phases[name], note = _reestimate(plan, name, new_phases[name], model_config)
            if note:
                notes.append(note)
    options = dict(plan.provenance.options)
    record = {"failed_devices": ir.device_ranges(failed_set) if failed_set else "",
              "loads_shifted": sorted(shifted), "seed": seed, "slack": slack, "time_limit": time_limit}
    if loads_spec is not None and shifted == set(plan.phases):
        record["loads"] = loads_spec
    options["replans"] = tuple(options.get("replans", ())) + (record,)
    runs = tuple(plan.provenance.solvers) + tuple(
        ir.SolverRun(name=f"replan {c.phase} ({', '.join(c.instances)}): {c.moved_slots} moved slots",
                     solver="migrate", status=f"repaired {c.repaired_layers}/{c.layers} layers",
                     objective=c.worst_after)
        for c in changes
    )
    provenance = replace(plan.provenance, options=options, solvers=runs)
    new_plan = replace(plan, prefill=new_phases.get("prefill"), decode=new_phases.get("decode"),
                       provenance=provenance)
    return ReplanResult(plan=new_plan, changes=tuple(changes), failed=tuple(sorted(failed_set)), notes=tuple(notes))


# --- Step 1: instances without their failed devices -----------------------------------------------


def _shrink(plan: ir.Plan, inst: ir.Instance, failed: set[int]) -> tuple[ir.Instance, tuple[int, ...]]:
    """The instance without its failed devices, and the surviving positions in its expert_devices."""
    dies = plan.topology.dies_per_device
    keep = tuple(k for k, d in enumerate(inst.expert_devices) if d not in failed)
    if not failed & set(inst.devices):
        return inst, keep

    def alive(ids: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(d for d in ids if d not in failed)

    attention, experts = alive(inst.attention_devices), alive(inst.expert_devices)
    lost = ir.device_ranges(sorted(failed & set(inst.devices)))
    if not attention:
        raise InfeasibleError(f"replan: instance {inst.id} loses all its attention devices ({lost}); "
                              "it cannot serve: re-compile the plan for the surviving devices")
    if not experts:
        raise InfeasibleError(f"replan: instance {inst.id} loses all its expert devices ({lost}); "
                              "it cannot serve: re-compile the plan for the surviving devices")
    attention_dies = len(attention) * dies
    if attention_dies % inst.attention_tp:
        raise InfeasibleError(
            f"replan: instance {inst.id} keeps {attention_dies} attention dies, not a multiple of its attention "
            f"TP {inst.attention_tp}; fail whole TP groups (list every device of the group in --failed-devices)")
    shared = alive(inst.shared_expert_devices)
    if plan.model.num_shared_experts and not shared:
        raise InfeasibleError(f"replan: instance {inst.id} loses every device computing the shared experts ({lost}); "
                              "re-compile the plan for the surviving devices")
    attention_dp = attention_dies // inst.attention_tp
    return replace(
        inst, devices=alive(inst.devices), attention_devices=attention, expert_devices=experts,
        shared_expert_devices=shared, attention_dp=attention_dp, ep=ir.expert_parallel_dies(experts, shared, dies),
        dp_domains=min(inst.dp_domains, attention_dp),
    ), keep


def _replan_phase(plan, name, phase, failed, loads, shifted, time_limit, seed, slack, workers):  # noqa: ANN001, ANN202
    """Steps 1-4 for one phase: new instances, placements re-solved per (old placement, survivors)."""
    groups: dict[tuple[int, tuple[int, ...]], list[int]] = {}
    shrunk = []
    for i, inst in enumerate(phase.instances):
        new_inst, keep = _shrink(plan, inst, failed)
        shrunk.append(new_inst)
        if shifted or len(keep) < len(inst.expert_devices):  # an attention-only loss keeps the placement
            groups.setdefault((inst.experts, keep), []).append(i)
    placements: list[ir.ExpertPlacement] = []
    index: dict[int, int] = {}  # instance -> index into `placements`
    kept_old: dict[int, int] = {}
    for i, inst in enumerate(phase.instances):
        if any(i in members for members in groups.values()):
            continue
        if inst.experts not in kept_old:
            kept_old[inst.experts] = len(placements)
            placements.append(phase.experts[inst.experts])
        index[i] = kept_old[inst.experts]
    changes = []
    for (old_index, keep), members in sorted(groups.items(), key=lambda kv: kv[1][0]):
        ids = tuple(phase.instances[i].id for i in members)
        placement, change = _resolve(plan, name, ids, phase.experts[old_index], keep, loads,
                                     time_limit, seed, slack, workers)
        for i in members:
            index[i] = len(placements)
        placements.append(placement)
        changes.append(change)
    # Number placements by first use so the plan reads in instance order.
    order: dict[int, int] = {}
    for i in range(len(phase.instances)):
        order.setdefault(index[i], len(order))
    experts = tuple(placements[k] for k in sorted(order, key=order.get))
    instances = tuple(replace(inst, experts=order[index[i]]) for i, inst in enumerate(shrunk))
    return replace(phase, instances=instances, experts=experts), changes


# --- Steps 2-4: one placement re-solved ------------------------------------------------------------


def _resolve(plan, phase, ids, old, keep, loads, time_limit, seed, slack, workers):  # noqa: ANN001, ANN202
    m = plan.model
    E, S = m.num_routed_experts, old.slots_per_device
    D = len(keep)
    if D * S < E:
        raise InfeasibleError(
            f"replan: {', '.join(ids)} keep {D} expert devices x {S} slots = {D * S} slots, fewer than the "
            f"{E} experts; every expert needs a replica: fail fewer devices or re-compile")
    split = "weighted" if old.weighted else "equal"
    L = len(m.moe_layers)
    old_tables = np.array([lp.phy2log for lp in old.layers], dtype=np.int64).reshape(L, old.devices, S)
    # Step 2: the from-scratch solve on the surviving devices: reference max load and replica counts.
    fresh = balance(loads, D, S, nodes=1, algorithm="ilp", split=split, time_limit=time_limit, seed=seed,
                    workers=workers)
    fresh_tables = fresh.phy2log.reshape(L, D, S)
    tables, shares, loads_out, repaired = [], [], [], 0
    for layer in range(L):
        survivors = [tuple(int(e) for e in row) for row in old_tables[layer][list(keep)]]
        # Steps 3-4: the balancer's migration step: the old layout repaired towards the fresh replica
        # counts, the fresh layout relabelled onto the old devices, or packed sticky; of those within
        # the slack of the fresh max load, the one that moves the fewest slots.
        picked = migrate(loads[layer], fresh_tables[layer], survivors, nodes=1, split=split, slack=slack,
                         reference=float(fresh.device_loads[layer].max()))
        repaired += picked.source == "repair"
        tables.append(picked.table)
        shares.append(picked.shares)
        loads_out.append(_device_loads(loads[layer], picked.table, picked.shares))
    layers = tuple(
        ir.LayerPlacement(layer=layer, phy2log=tables[i].reshape(-1), device_loads=loads_out[i],
                          shares=None if shares[i] is None else _round_shares(tables[i].reshape(-1),
                                                                              shares[i].reshape(-1)))
        for i, layer in enumerate(m.moe_layers)
    )
    placement = ir.ExpertPlacement(devices=D, slots_per_device=S, layers=layers, algorithm=f"replan/{split}")

    before = [_ratio(_device_loads(loads[i], old_tables[i], _old_shares(old, i))) for i in range(L)]
    after = [_ratio(x) for x in loads_out]
    olds = [[tuple(old_tables[i][k]) for k in keep] for i in range(L)]
    moved = sum(moved_slots(tables[i], olds[i]) for i in range(L))
    scratch_moved = sum(moved_slots(fresh_tables[i], olds[i]) for i in range(L))
    change = PlacementChange(
        phase=phase, instances=ids, devices_before=old.devices, devices_after=D, slots_per_device=S,
        moved_slots=moved, lost_slots=(old.devices - D) * S * L, migration_bytes=moved * m.expert_bytes,
        balance_before=float(np.mean(before)), balance_after=float(np.mean(after)),
        worst_before=float(np.max(before)), worst_after=float(np.max(after)),
        scratch_balance=float(np.mean(fresh.max_over_mean)), scratch_worst=float(np.max(fresh.max_over_mean)),
        scratch_moved=scratch_moved,
        repaired_layers=repaired, layers=L,
    )
    return placement, change


def _device_loads(load: np.ndarray, table: np.ndarray, share: np.ndarray | None) -> tuple[float, ...]:
    if share is None:
        counts = np.bincount(table.reshape(-1), minlength=load.shape[0])
        share = 1.0 / np.maximum(counts, 1)[table]
    return tuple(float(x) for x in (share * load[table]).sum(axis=1))


def _old_shares(old: ir.ExpertPlacement, i: int) -> np.ndarray | None:
    s = old.layers[i].shares
    return None if s is None else np.array(s).reshape(old.devices, old.slots_per_device)


def _ratio(device_loads: Sequence[float]) -> float:
    mean = sum(device_loads) / len(device_loads)
    return max(device_loads) / mean if mean > 0 else 1.0


def _round_shares(row: np.ndarray, shares: np.ndarray) -> tuple[float, ...]:
    """Shares to 6 decimals with every expert's shares still summing to exactly 1."""
    out = np.round(shares, 6)
    for e in np.unique(row):
        slots = np.flatnonzero(row == e)
        out[slots[-1]] = round(1.0 - float(out[slots[:-1]].sum()), 6)
    return tuple(float(v) for v in out)


def _reestimate(plan: ir.Plan, name: str, phase: ir.Phase,
                model_config: str | None = None) -> tuple[ir.Phase, str]:
    """The phase with predictions and memory from the cost model (the slowest instance; throughput
    averaged over devices), or unchanged with a note when the model or deployment cannot be scored."""
    from planner.compile import memory_of, prediction_of  # the compile driver's own IR conversions
    from planner.frontend.shape import shape_of
    from planner.frontend.zoo import BUNDLED, load_source
    from costmodels.topology import get_topology

    keep = f"{name} predictions kept from the old plan"
    # the model: a bundled name, or the config the user passed; never a path the plan recorded
    if model_config is not None:
        if load_source(model_config).digest() != plan.model.config_sha256:
            raise InputError(f"replan: --model-config {model_config}: its digest is not the plan's "
                             "model.config_sha256; pass the config the plan was compiled from")
        source = model_config
    elif plan.model.name in BUNDLED:
        source = plan.model.name
    else:
        return phase, (f"{keep}: {plan.model.name[:80]!r} is not a bundled model; pass its config with --model-config PATH "
                       "to re-estimate")
    try:
        shape = shape_of(str(source))
        topo = get_topology(plan.topology.name)
    except Exception as exc:  # noqa: BLE001 - any failure to rebuild the model means: keep the old numbers
        return phase, f"{keep}: cannot rebuild {source} ({str(exc).splitlines()[0][:100]})"
    estimates: dict[tuple, Estimate] = {}
    scored = []
    for inst in phase.instances:
        placement = phase.experts[inst.experts]
        balances = [lp.balance for lp in placement.layers if lp.balance is not None]
        imbalance = max(1.0, float(np.mean(balances))) if balances else 1.0
        key = (inst.mode, len(inst.devices), len(inst.attention_devices), len(inst.expert_devices),
               inst.batch_per_device, inst.microbatches, inst.dp_domains, inst.attention_tp, round(imbalance, 9))
        if key not in estimates:
            try:
                estimates[key] = estimate_instance(plan, name, inst, shape, topo, imbalance)
            except InputError as exc:
                return phase, f"{keep}: the cost model refuses the shrunk {inst.id} ({exc})"
        scored.append((inst, estimates[key]))
    latency = (lambda e: e.tpot_ms) if name == "decode" else (lambda e: e.ttft_ms)
    worst_inst, worst = max(scored, key=lambda s: (latency(s[1]), s[0].id))
    devices = sum(len(inst.devices) for inst, _ in scored)
    tput = sum(est.throughput_per_device * len(inst.devices) for inst, est in scored) / devices
    pred = replace(prediction_of(worst), throughput_per_device=tput)
    refused = [est for _, est in scored if not est.feasible]
    if refused:
        pred = replace(pred, feasible=False, infeasible_reason=refused[0].infeasible_reason or "infeasible")
    memory: dict[str, ir.MemoryUse] = {}
    for inst, est in scored:
        for role, use in memory_of(est, inst.mode, plan.topology.dies_per_device).items():
            if role not in memory or use.used_gb > memory[role].used_gb:
                memory[role] = use
    return replace(phase, predictions=pred, memory=memory), ""


def estimate_instance(plan: ir.Plan, name: str, inst: ir.Instance, shape: ModelShape, topo: Topology,
                      imbalance: float, *, chunked: bool | None = None) -> Estimate:
    """The cost model's estimate of one instance, built the way `planner.search` builds candidates."""
    from costmodels.serving import DecodeDeployment, PrefillDeployment, estimate_decode, estimate_prefill

    wl = plan.workload
    if name == "decode":
        # what every decode instance shares; the mode and its device counts are replaced below
        common = DecodeDeployment(batch_per_device=inst.batch_per_device, microbatches=inst.microbatches,
                                  kv_len=wl.input_len + wl.output_len // 2, mtp_accept=wl.mtp_accept,
                                  quant=wl.quant, imbalance=imbalance, attn_tp=inst.attention_tp)
        if inst.mode == "disaggregated":
            moe = len(set(inst.devices) - set(inst.attention_devices))
            dep = replace(common, mode="disaggregated", attention_devices=len(inst.attention_devices), moe_devices=moe,
                          dp_domains=inst.dp_domains)
        else:
            dep = replace(common, mode="colocated", devices=len(inst.devices))
        if plan.prefill is None if chunked is None else chunked:  # aggregated: prompts chunked into each step
            from costmodels.aggregated import AggregatedDeployment, estimate_aggregated

            return estimate_aggregated(shape, topo, AggregatedDeployment(dep, input_len=wl.input_len,
                                                                         output_len=wl.output_len,
                                                                         prefix_hit=wl.prefix_hit))
        return estimate_decode(shape, topo, dep)
    prefill = PrefillDeployment(devices=len(inst.devices), tokens_per_device=int(round(inst.batch_per_device)),
                                prompt_len=wl.input_len, microbatches=inst.microbatches,
                                prefix_hit=wl.prefix_hit, quant=wl.quant, imbalance=imbalance,
                                attn_tp=inst.attention_tp)
    return estimate_prefill(shape, topo, prefill)
