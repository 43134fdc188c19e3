"""Re-plan a plan after device failures or a load shift, moving as few expert replicas as possible.

`replan(plan, failed=..., loads=...)` drops failed devices from their instances, re-solves the
expert placement of every affected instance shape, re-estimates predictions with the cost model and
keeps the rest of the plan. Steps are numbered as in the README section "podplan replan".
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Sequence

import numpy as np

from costmodels.errors import InfeasibleError, InputError
from planner.ir import plan as ir
from planner.balance.balancer import BalanceResult, balance
from planner.balance.ilp import weighted_shares
from planner.balance.migrate import keep_positions, migrate, moved_slots
from planner.balance.loads import is_generator, read_loads

if TYPE_CHECKING:
    from costmodels.model_shape import ModelShape
    from costmodels.serving import Estimate
    from costmodels.topology import Topology

# Default tolerance on a re-solved layer: keep the layout with the fewest moved slots whose max
# device load is within this fraction of the from-scratch solve on the surviving devices. The
# issue 8 acceptance bar is 2 %; 1.5 % leaves room for the weighted-split LP's rounding.
DEFAULT_SLACK = 0.015

# Polishing exchanges k experts between the most loaded device and another one; k grows while the
# number of exchange patterns per device pair stays below this (S = 4: all 70; S = 8: single swaps).
_MAX_PATTERNS = 300

_REL = 1e-12  # relative tolerance when comparing loads


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
                     solver="repair+polish/migrate", status=f"repaired {c.repaired_layers}/{c.layers} layers",
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
        shared_expert_devices=shared, attention_dp=attention_dp, ep=len(experts) * dies,
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
        survivors = old_tables[layer][list(keep)]
        # Step 3: repair the old layout towards the fresh counts; Step 4: keep it or the balancer's
        # migration (the fresh layout relabelled onto the old devices), whichever moves fewer slots.
        table, share, peak, ok = _layer(loads[layer], survivors, fresh, layer, fresh_tables[layer], split, slack)
        repaired += ok
        tables.append(table)
        shares.append(share)
        loads_out.append(_device_loads(loads[layer], table, share))
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


def _layer(load, survivors, fresh: BalanceResult, layer, fresh_table, split, slack):  # noqa: ANN001, ANN202
    """(table [D, S], shares or None, max load, repaired?) of one layer: of the repair and the
    balancer's own migration (`balance_migrate.migrate`), the fewest moved slots within the slack."""
    reference = float(fresh.device_loads[layer].max())
    limit = reference * (1 + slack) * (1 + 1e-9)
    old = [tuple(int(e) for e in row) for row in survivors]
    options = []
    table = repair(load, survivors, fresh.logcnt[layer], reference * (1 + slack))
    if table is not None:
        share, peak = _split(load, table, split)
        options.append((moved_slots(table, old), peak, 0, table, share))
    picked = migrate(load, fresh_table, old, nodes=1, split=split, slack=slack, reference=reference)
    share, peak = _split(load, picked.table, split)
    options.append((picked.moved, peak, 1, picked.table, share))
    fitting = [o for o in options if o[1] <= limit]
    best = min(fitting, key=lambda o: o[:3]) if fitting else min(options, key=lambda o: (o[1], o[2]))
    return best[3], best[4], best[1], best[2] == 0


def _split(load: np.ndarray, table: np.ndarray, split: str) -> tuple[np.ndarray | None, float]:
    if split == "weighted":
        share, peak = weighted_shares(load, table)
        return share, float(peak)
    counts = np.bincount(table.reshape(-1), minlength=load.shape[0])
    return None, float((load / np.maximum(counts, 1))[table].sum(axis=1).max())


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


# --- the repair: few moves from the old layout to a balanced one ----------------------------------


def repair(load: np.ndarray, survivors: np.ndarray, counts: np.ndarray, target: float) -> np.ndarray | None:
    """A layout [D, S] with replica `counts` that keeps most of `survivors` and loads no device above `target`
    if it can (else as low as the local search gets); None when the counts cannot be placed.

    load: [E] tokens; survivors: [D, S] the old experts of the surviving devices (experts whose
    replicas all sat on failed devices are missing); counts: [E] replicas (sum D * S, each <= D).
    Step 3a frees surplus replicas on the most loaded devices; 3b places missing replicas, heaviest
    first, on the lightest device with a free slot; 3c re-partitions the experts of the most
    loaded device and another one while the max (then the sum of squares) drops, fewest moves first.
    """
    D, S = survivors.shape
    E = load.shape[0]
    size = load / np.maximum(counts, 1)
    table = survivors.copy()
    have = np.bincount(table.reshape(-1), minlength=E)
    free = np.zeros((D, S), dtype=bool)
    projected = size[table].sum(axis=1)
    # Step 3a: surplus replicas leave the devices with the highest projected load.
    for e in np.argsort(-size, kind="stable"):
        for _ in range(int(have[e] - counts[e])):
            holders = np.flatnonzero(((table == e) & ~free).any(axis=1))
            d = int(holders[np.argmax(projected[holders])])
            free[d, int(np.flatnonzero((table[d] == e) & ~free[d])[0])] = True
            projected[d] -= size[e]
    # Step 3b: missing replicas, heaviest first, to the lightest device with room that lacks them.
    for e in np.argsort(-size, kind="stable"):
        for _ in range(int(counts[e] - have[e])):
            holds = ((table == e) & ~free).any(axis=1)
            room = free.any(axis=1) & ~holds
            if room.any():
                cand = np.flatnonzero(room)
                d = int(cand[np.argmin(projected[cand])])
                j = int(np.flatnonzero(free[d])[0])
                table[d, j], free[d, j] = e, False
                projected[d] += size[e]
            elif not _relay(table, free, holds, projected, size, int(e)):
                return None
    return _polish(size, table, survivors, target)


def _relay(table: np.ndarray, free: np.ndarray, holds: np.ndarray, projected: np.ndarray, size: np.ndarray,
           e: int) -> bool:
    """Every free slot sits on a device that already holds e: move an expert g from a device
    lacking e into such a free slot and put e where g was (least projected max load first)."""
    best = None
    for d in np.flatnonzero(free.any(axis=1)):
        j = int(np.flatnonzero(free[d])[0])
        for d2 in np.flatnonzero(~holds):
            for j2 in np.flatnonzero(~free[d2]):
                g = int(table[d2, j2])
                if ((table[d] == g) & ~free[d]).any():
                    continue
                worst = max(projected[d] + size[g], projected[d2] - size[g] + size[e])
                key = (worst, int(d), j, int(d2), int(j2))
                if best is None or key < best:
                    best = key
    if best is None:
        return False
    _, to_d, to_j, from_d, from_j = best  # g moves from (from_d, from_j) to the free slot (to_d, to_j)
    g = int(table[from_d, from_j])
    table[to_d, to_j], free[to_d, to_j] = g, False
    table[from_d, from_j] = e
    projected[to_d] += size[g]
    projected[from_d] += size[e] - size[g]
    return True


def _patterns(slots: int) -> np.ndarray:
    """Masks [K, 2S] choosing which S of two devices' 2S experts go to the first device.

    All splits when few enough (S <= 4), else those exchanging at most k experts."""
    mine, theirs = range(slots), range(slots, 2 * slots)
    out: list[np.ndarray] = []
    for k in range(slots + 1):
        level = []
        for give in itertools.combinations(mine, k):
            for take in itertools.combinations(theirs, k):
                mask = np.zeros(2 * slots, dtype=bool)
                mask[[i for i in mine if i not in give]] = True
                mask[list(take)] = True
                level.append(mask)
        if out and len(out) + len(level) > _MAX_PATTERNS:
            break
        out += level
    return np.array(out)


def _polish(size: np.ndarray, table: np.ndarray, old: np.ndarray, target: float) -> np.ndarray:
    """Step 3c: re-partition the top device with another while (max, sum of squares) drops."""
    table = table.copy()
    D, S = table.shape
    if D < 2:
        return table
    was = np.zeros((D, size.shape[0]), dtype=bool)
    was[np.arange(D)[:, None], old] = True
    masks = _patterns(S)
    mine, theirs = masks.astype(np.int64), (~masks).astype(np.int64)
    K = masks.shape[0]
    for _ in range(4 * D * S):
        loads = size[table].sum(axis=1)
        top = float(loads.max())
        if top <= target:
            break
        d1 = int(np.argmax(loads))
        sq0 = float(np.square(loads).sum())
        others = np.delete(np.arange(D), d1)
        pool = np.concatenate([np.broadcast_to(table[d1], (D - 1, S)), table[others]], axis=1)  # [N, 2S]
        weight = size[pool]
        side = weight @ masks.T  # [N, K] load of d1 after the split
        rest_side = weight.sum(axis=1, keepdims=True) - side
        ranked = [int(d) for d in np.argsort(-loads, kind="stable")[:3] if d != d1]
        rest = np.where(others == ranked[0], loads[ranked[1]] if len(ranked) > 1 else -np.inf, loads[ranked[0]])
        new_top = np.maximum(rest[:, None], np.maximum(side, rest_side))
        sq = sq0 - loads[d1] ** 2 - loads[others][:, None] ** 2 + side ** 2 + rest_side ** 2
        valid = _unique_sides(table, d1, others, masks)
        # moved slots after the split: experts new to d1 on its side, new to d2 on the other
        cost = (~was[d1][pool]).astype(np.int64) @ mine.T + (~was[others[:, None], pool]).astype(np.int64) @ theirs.T
        better = (new_top < top * (1 - _REL)) | ((new_top <= top * (1 + _REL)) & (sq < sq0 * (1 - _REL)))
        ok = valid & better
        if not ok.any():
            break
        rounded = np.where(ok, np.round(new_top / max(top, 1e-300), 9), np.inf).reshape(-1)
        pick = int(np.lexsort((sq.reshape(-1), cost.reshape(-1), rounded))[0])
        n, k = divmod(pick, K)
        d2 = int(others[n])
        table[d1] = keep_positions(pool[n][masks[k]], old[d1])
        table[d2] = keep_positions(pool[n][~masks[k]], old[d2])
    return table


def _unique_sides(table: np.ndarray, d1: int, others: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """[N, K]: split k of d1 with others[n] leaves no device holding an expert twice.

    Only an expert both devices hold can end up twice on one side: its two copies must split."""
    S = table.shape[1]
    valid = np.ones((others.shape[0], masks.shape[0]), dtype=bool)
    theirs = table[others]  # [N, S]
    for i in range(S):
        n, k = np.nonzero(theirs == table[d1, i])
        if n.size:
            valid[n] &= masks[:, i][None, :] != masks[:, S + k].T
    return valid


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
                estimates[key] = _estimate(plan, name, inst, shape, topo, imbalance)
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


def _estimate(plan: ir.Plan, name: str, inst: ir.Instance, shape: ModelShape, topo: Topology,
              imbalance: float) -> Estimate:
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
            dep = replace(common, mode="afd", attention_devices=len(inst.attention_devices), moe_devices=moe,
                          dp_domains=inst.dp_domains)
        else:
            dep = replace(common, mode="colocated", devices=len(inst.devices))
        return estimate_decode(shape, topo, dep)
    prefill = PrefillDeployment(devices=len(inst.devices), tokens_per_device=int(round(inst.batch_per_device)),
                                prompt_len=wl.input_len, microbatches=inst.microbatches,
                                prefix_hit_rate=wl.prefix_hit, quant=wl.quant, imbalance=imbalance,
                                attn_tp=inst.attention_tp)
    return estimate_prefill(shape, topo, prefill)
