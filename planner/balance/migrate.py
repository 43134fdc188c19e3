"""Migration-aware placement: stay close to a previous layout, move few expert replicas.

The one migration step of `podplan balance --previous` and `podplan replan`. Three candidates per
layer: the fresh layout with its devices relabelled to overlap the old ones most (an assignment
problem, OR-Tools); the old layout repaired towards the fresh replica counts
(`planner.balance.repair`); and the fresh replica counts packed "sticky" (old places first), then
swaps that prefer replicas already moved. The one with the fewest moved slots whose max load is
within the slack of the fresh one wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ortools.graph.python import linear_sum_assignment

from planner.balance import ilp as balance_ilp
from planner.balance import search as balance_search
from planner.balance.repair import keep_positions, repair


@dataclass(frozen=True)
class Migration:
    """A layout [D, S] chosen for few moves, its shares (weighted split), moved slots."""

    table: np.ndarray
    shares: np.ndarray | None
    moved: int
    source: str


def moved_slots(table: np.ndarray, old: list[tuple[int, ...]]) -> int:
    """Slots that must load new weights: experts a device did not hold before."""
    return sum(len(set(row.tolist()) - set(old[d])) for d, row in enumerate(table))


def migrate(
    load: np.ndarray,
    table: np.ndarray,
    old: list[tuple[int, ...]],
    *,
    nodes: int,
    split: str,
    slack: float,
    reference: float,
) -> Migration:
    """Pick the layout with the fewest moved slots whose max load <= reference * (1 + slack).

    load: [E] tokens; table: the best fresh layout [D, S]; old: the expert ids each new
    device held before (empty for a fresh device); reference: the fresh layout's max load.
    """
    limit = reference * (1 + slack) * (1 + 1e-12)
    relabelled = _align_slots(_relabel(table, old, nodes), old)
    options = [_finish(load, relabelled, old, split, "relabel")]
    if nodes == 1:
        counts = np.bincount(table.reshape(-1), minlength=load.shape[0])
        repaired = repair(load, old, counts, reference * (1 + slack))
        if repaired is not None:
            options.append(_finish(load, repaired, old, split, "repair"))
        target = float(balance_search.table_loads(load, table).max()) * (1 + slack)
        was = _was(old, table.shape[0], load.shape[0])
        sticky = _sticky(load, counts, old, table.shape, float(balance_search.table_loads(load, table).max()))
        if sticky is not None:
            sticky = _move_aware_swaps(load, sticky, was, target)
            options.append(_finish(load, _align_slots(sticky, old), old, split, "sticky"))
    fitting = [(m.moved, peak, i) for i, (m, peak) in enumerate(options) if peak <= limit]
    if not fitting:
        return options[0][0]
    return options[min(fitting)[2]][0]


def _finish(
    load: np.ndarray, table: np.ndarray, old: list[tuple[int, ...]], split: str, source: str
) -> tuple[Migration, float]:
    if split == "weighted":
        shares, peak = balance_ilp.weighted_shares(load, table)
    else:
        shares, peak = None, float(balance_search.table_loads(load, table).max())
    return Migration(table=table, shares=shares, moved=moved_slots(table, old), source=source), peak


def _relabel(table: np.ndarray, old: list[tuple[int, ...]], nodes: int) -> np.ndarray:
    """Permute devices (within node blocks, and whole blocks) to maximise kept replicas."""
    devices, slots = table.shape
    per = devices // nodes
    new_sets = [set(row.tolist()) for row in table]
    overlap = np.array([[len(new_sets[a] & set(old[b])) for b in range(devices)] for a in range(devices)])
    block_gain = np.zeros((nodes, nodes), dtype=np.int64)
    block_match: dict[tuple[int, int], list[int]] = {}
    for a in range(nodes):
        for b in range(nodes):
            sub = overlap[a * per : (a + 1) * per, b * per : (b + 1) * per]
            match = _assign(sub)
            block_match[a, b] = match
            block_gain[a, b] = sum(sub[i, match[i]] for i in range(per))
    blocks = _assign(block_gain) if nodes > 1 else [0]
    out = np.zeros_like(table)
    for a in range(nodes):
        b = blocks[a]
        for i, j in enumerate(block_match[a, b]):
            out[b * per + j] = table[a * per + i]
    return out


def _assign(gain: np.ndarray) -> list[int]:
    """Maximum-gain perfect matching rows -> columns (OR-Tools linear sum assignment)."""
    n = gain.shape[0]
    if n == 1:
        return [0]
    top = int(gain.max()) if gain.size else 0
    solver = linear_sum_assignment.SimpleLinearSumAssignment()
    for i in range(n):
        for j in range(n):
            solver.add_arc_with_cost(i, j, top - int(gain[i, j]))
    if solver.solve() != solver.OPTIMAL:
        return list(range(n))
    return [solver.right_mate(i) for i in range(n)]


def _align_slots(table: np.ndarray, old: list[tuple[int, ...]]) -> np.ndarray:
    """Put every kept expert back in its old slot index on each device."""
    out = table.copy()
    for d, row in enumerate(table):
        out[d] = keep_positions(row, old[d])
    return out


def _was(old: list[tuple[int, ...]], devices: int, experts: int) -> np.ndarray:
    was = np.zeros((devices, experts), dtype=bool)
    for d in range(devices):
        was[d, list(old[d])] = True
    return was


def _sticky(
    load: np.ndarray, counts: np.ndarray, old: list[tuple[int, ...]], shape: tuple[int, int], cap: float
) -> np.ndarray | None:
    """Pack `counts` keeping old replicas in place while a device stays under `cap`, then
    the rest largest first onto the lightest device with room (no duplicates)."""
    devices, slots = shape
    size = load / np.maximum(counts, 1)
    table = np.full((devices, slots), -1, dtype=np.int64)
    fill = np.zeros(devices, dtype=np.int64)
    kept = np.zeros(load.shape[0], dtype=np.int64)
    loads = np.zeros(devices)
    for d in range(devices):
        for e in sorted(set(old[d]), key=lambda e: (-size[e], e)):
            if fill[d] < slots and kept[e] < counts[e] and loads[d] + size[e] <= cap:
                table[d, fill[d]] = e
                fill[d] += 1
                kept[e] += 1
                loads[d] += size[e]
    rest = sorted((e for e in range(load.shape[0]) for _ in range(counts[e] - kept[e])), key=lambda e: (-size[e], e))
    for e in rest:
        room = [d for d in range(devices) if fill[d] < slots and e not in table[d]]
        if not room:
            return None
        d = min(room, key=lambda d: (loads[d], d))
        table[d, fill[d]] = e
        fill[d] += 1
        loads[d] += size[e]
    return table


def _move_aware_swaps(load: np.ndarray, table: np.ndarray, was: np.ndarray, target: float) -> np.ndarray:
    """Swap replicas off the most loaded device until it is under `target`, choosing among
    the improving swaps the one that adds the fewest moved slots (then the lowest max)."""
    table = table.copy()
    devices, slots = table.shape
    counts = np.bincount(table.reshape(-1), minlength=load.shape[0])
    item = (load / np.maximum(counts, 1))[table]
    loads = item.sum(axis=1)
    held = np.zeros_like(was)
    held[np.arange(devices)[:, None], table] = True
    owner = np.repeat(np.arange(devices), slots)
    for _ in range(4 * devices * slots):
        d = int(np.argmax(loads))
        top = loads[d]
        if top <= target:
            break
        flat_e, flat_s = table.reshape(-1), item.reshape(-1)
        best = None
        for i in range(slots):
            x, ex = item[d, i], table[d, i]
            new = np.maximum(top - x + flat_s, loads[owner] - flat_s + x)
            ok = (flat_s < x) & (owner != d) & ~held[owner, ex] & ~held[d, flat_e] & (new < top * (1 - 1e-12))
            if not ok.any():
                continue
            idx = np.flatnonzero(ok)
            cost = (~was[owner[idx], ex]).astype(int) + (~was[d, flat_e[idx]]).astype(int) \
                - int(not was[d, ex]) - (~was[owner[idx], flat_e[idx]]).astype(int)
            k = int(np.lexsort((idx, new[idx], cost))[0])
            key = (int(cost[k]), float(new[idx[k]]), i, int(idx[k]))
            if best is None or key < best:
                best = key
        if best is None:
            break
        _, _, i, j = best
        balance_search.swap_slots(table, item, held, loads, d, i, *divmod(j, slots))
    return table
