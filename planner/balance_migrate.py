"""Migration-aware placement: stay close to a previous layout, move few expert replicas.

Two candidates per layer: the fresh layout with its devices relabelled to overlap the
old ones most (an assignment problem, OR-Tools), and the old layout repaired (lost
experts re-homed, empty slots filled) then rebalanced one replica move at a time. The
one with fewer moved slots whose max load is within the slack of the fresh one wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ortools.graph.python import linear_sum_assignment

from planner import balance_ilp, balance_search


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
        equal_reference = float(balance_search.table_loads(load, table).max())
        repaired = _repair(load, old, table.shape, equal_reference * (1 + slack))
        if repaired is not None:
            options.append(_finish(load, _align_slots(repaired, old), old, split, "repair"))
    fitting = [(m.moved, peak, i) for i, (m, peak) in enumerate(options) if peak <= limit]
    if not fitting:
        return options[0][0]
    return options[min(fitting)[2]][0]


def _finish(load, table, old, split, source) -> tuple[Migration, float]:  # noqa: ANN001
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
    """Put every kept expert back in its old slot index on the device."""
    out = table.copy()
    slots = table.shape[1]
    for d, row in enumerate(table):
        placed = [-1] * slots
        rest = []
        for e in row.tolist():
            where = old[d].index(e) if e in old[d] else -1
            if 0 <= where < slots and placed[where] < 0:
                placed[where] = e
            else:
                rest.append(e)
        for i in range(slots):
            if placed[i] < 0:
                placed[i] = rest.pop(0)
        out[d] = placed
    return out


def _repair(load: np.ndarray, old: list[tuple[int, ...]], shape: tuple[int, int], target: float) -> np.ndarray | None:
    """The old layout made valid for this shape, then rebalanced by single replica moves."""
    devices, slots = shape
    experts = load.shape[0]
    table = np.full((devices, slots), -1, dtype=np.int64)
    for d in range(devices):
        kept: list[int] = []
        for e in old[d]:
            if e not in kept and len(kept) < slots:
                kept.append(e)
        table[d, : len(kept)] = kept
    # Lost experts first (heaviest first): an empty slot, else evict a spare replica.
    for e in np.argsort(-load, kind="stable"):
        if (table == e).any():
            continue
        if not _place_lost(load, table, int(e)):
            return None
    # Fill empty slots with the expert whose replicas carry the most, Replicate-style.
    for d in range(devices):
        for j in range(slots):
            if table[d, j] >= 0:
                continue
            counts = np.bincount(table[table >= 0], minlength=experts)
            per = np.where(np.isin(np.arange(experts), table[d]), -1.0, load / np.maximum(counts, 1) / (counts + 1))
            if per.max() < 0:
                return None
            table[d, j] = int(np.argmax(per))
    return _rebalance(load, table, old, target)


def _place_lost(load: np.ndarray, table: np.ndarray, e: int) -> bool:
    experts = load.shape[0]
    filled = table >= 0
    counts = np.bincount(table[filled], minlength=experts)
    loads = np.where(filled, (load / np.maximum(counts, 1))[np.maximum(table, 0)], 0.0).sum(axis=1)
    free = [(loads[d], d, j) for d, j in zip(*np.nonzero(~filled)) if e not in table[d]]
    if free:
        _, d, j = min(free)
        table[d, j] = e
        return True
    best = None
    for d, j in zip(*np.nonzero(filled)):
        g = table[d, j]
        if counts[g] < 2 or e in table[d]:
            continue
        after = loads[d] - load[g] / counts[g] + load[e]
        if best is None or after < best[0]:
            best = (after, d, j)
    if best is None:
        return False
    table[best[1], best[2]] = e
    return True


def _rebalance(load: np.ndarray, table: np.ndarray, old: list[tuple[int, ...]], target: float) -> np.ndarray:
    """Move one replica (expert g's slot handed to expert e) or swap two, best new max
    first, until the max load reaches `target` or no move lowers it."""
    devices, slots = table.shape
    table = table.copy()
    experts = load.shape[0]
    was = np.zeros((devices, experts), dtype=bool)
    for d in range(devices):
        was[d, list(old[d])] = True
    for _ in range(4 * devices * slots):
        counts = np.bincount(table.reshape(-1), minlength=experts)
        size = load / counts
        loads = size[table].sum(axis=1)
        top = float(loads.max())
        if top <= target:
            break
        move = _best_transfer(load, table, counts, size, loads, was)
        swap = balance_search.swap_search(load, table, max_iters=1)
        swap_top = float(balance_search.table_loads(load, swap).max())
        if move is not None and move[0] <= swap_top:
            _, d, j, e = move
            table[d, j] = e
        elif swap_top < top * (1 - 1e-12):
            table = swap
        else:
            break
    return table


def _best_transfer(load, table, counts, size, loads, was):  # noqa: ANN001, ANN202 - private
    """Best (new max, device, slot, expert): a slot of g elsewhere handed to an expert e
    of the most loaded device. Ties prefer slots whose expert was new there anyway."""
    devices, slots = table.shape
    experts = load.shape[0]
    held = np.zeros((devices, experts), dtype=bool)
    held[np.arange(devices)[:, None], table] = True
    top_d = int(np.argmax(loads))
    top = float(loads[top_d])
    best = None
    spare = counts >= 2
    grow_g = np.where(spare, load / np.maximum(counts - 1, 1) - size, 0.0)  # [E] growth per g replica
    for e in sorted(set(table[top_d].tolist())):
        if counts[e] >= devices:
            continue
        new_e = load[e] / (counts[e] + 1)
        base = loads + (new_e - size[e]) * held[:, e]  # [D]
        # v[g, d]: loads after g loses a replica (before fixing the device it leaves).
        v = base[None, :] + grow_g[:, None] * held.T  # [E, D]
        order = np.sort(v, axis=1)
        first, second = order[:, -1], order[:, -2] if devices > 1 else np.full(experts, -np.inf)
        for d, j in zip(*np.nonzero(~held[:, e][:, None] & np.ones((1, slots), dtype=bool))):
            g = table[d, j]
            if not spare[g] or g == e:
                continue
            row = v[g]
            rest = second[g] if row[d] == first[g] else first[g]
            here = loads[d] - size[g] + new_e
            new_top = max(rest, here)
            if new_top >= top * (1 - 1e-12):
                continue
            cost = int(not was[d, e]) - int(not was[d, g])
            key = (new_top, cost, d, j, e)
            if best is None or key < best:
                best = key
    if best is None:
        return None
    return best[0], best[2], best[3], best[4]
