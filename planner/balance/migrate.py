"""Migration-aware placement: stay close to a previous layout, move few expert replicas.

Three candidates per layer: the fresh layout with its devices relabelled to overlap the
old ones most (an assignment problem, OR-Tools); the old layout repaired (lost experts
re-homed, empty slots filled) then rebalanced one replica move at a time; and the fresh
replica counts packed "sticky" (old places first). The last two finish with swaps that
prefer replicas already moved. The one with the fewest moved slots whose max load is
within the slack of the fresh one wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ortools.graph.python import linear_sum_assignment

from planner.balance import ilp as balance_ilp
from planner.balance import search as balance_search


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
        target = float(balance_search.table_loads(load, table).max()) * (1 + slack)
        was = _was(old, table.shape[0], load.shape[0])
        repaired = _repair(load, old, table.shape, target)
        if repaired is not None:
            repaired = _move_aware_swaps(load, repaired, was, target)
            options.append(_finish(load, _align_slots(repaired, old), old, split, "repair"))
        counts = np.bincount(table.reshape(-1), minlength=load.shape[0])
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


def keep_positions(experts: np.ndarray, old_row: tuple[int, ...] | np.ndarray) -> np.ndarray:
    """One device's experts [S], with every one it held before back in its old slot index.

    Engines copy weights slot by slot, so an expert that stays on a device but changes slot
    would still be a copy; the rest fill the free slots in order.
    """
    slots = len(experts)
    old = [int(e) for e in old_row]
    row = [-1] * slots
    rest = []
    for e in (int(x) for x in experts):
        j = old.index(e) if e in old else -1
        if 0 <= j < slots and row[j] < 0:
            row[j] = e
        else:
            rest.append(e)
    for j in range(slots):
        if row[j] < 0:
            row[j] = rest.pop(0)
    return np.array(row, dtype=np.int64)


def _align_slots(table: np.ndarray, old: list[tuple[int, ...]]) -> np.ndarray:
    """Put every kept expert back in its old slot index on each device."""
    out = table.copy()
    for d, row in enumerate(table):
        out[d] = keep_positions(row, old[d])
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
    """Hand one slot from expert g to expert e, or swap two replicas, while (max load, sum
    of squared loads) drops, until the max reaches `target` or no move helps."""
    devices, slots = table.shape
    table = table.copy()
    experts = load.shape[0]
    was = _was(old, devices, experts)
    for _ in range(2 * devices * slots):
        counts = np.bincount(table.reshape(-1), minlength=experts)
        size = load / counts
        loads = size[table].sum(axis=1)
        now = (float(loads.max()), float(np.square(loads).sum()))
        if now[0] <= target:
            break
        move = _best_transfer(load, table, counts, size, loads, was)
        swap = balance_search.swap_search(load, table, max_iters=1)
        swap_loads = balance_search.table_loads(load, swap)
        swap_key = (float(swap_loads.max()), float(np.square(swap_loads).sum()))
        if move is not None and move[0] <= swap_key and move[0] < now:
            _, d, j, e = move
            table[d, j] = e
        elif swap_key[0] < now[0] * (1 - 1e-12):
            table = swap
        else:
            break
    return table


def _best_transfer(
    load: np.ndarray, table: np.ndarray, counts: np.ndarray, size: np.ndarray, loads: np.ndarray, was: np.ndarray
) -> tuple | None:
    """Best ((new max, new sum of squares), device, slot, expert): one slot of a spare
    replica of g handed to expert e. e: the experts of the two most loaded devices and the
    eight cheapest to add. Ties prefer slots whose expert was new there anyway."""
    devices, slots = table.shape
    experts = load.shape[0]
    held = np.zeros((devices, experts), dtype=bool)
    held[np.arange(devices)[:, None], table] = True
    spare = counts >= 2
    grow_g = np.where(spare, load / np.maximum(counts - 1, 1) - size, 0.0)  # [E]
    heavy = np.argsort(-loads, kind="stable")[:2]
    open_ = np.flatnonzero(counts < devices)
    cheap = open_[np.argsort(load[open_] / (counts[open_] + 1), kind="stable")[:8]]
    candidates = sorted(set(table[heavy].reshape(-1).tolist()) | set(cheap.tolist()))
    best = None
    for e in candidates:
        if counts[e] >= devices:
            continue
        new_e = load[e] / (counts[e] + 1)
        base = loads + (new_e - size[e]) * held[:, e]  # [D]
        v = base[None, :] + grow_g[:, None] * held.T  # [E, D]: g lost a replica somewhere
        order = np.sort(v, axis=1)
        first = order[:, -1]
        second = order[:, -2] if devices > 1 else np.full(experts, -np.inf)
        squares = np.square(v).sum(axis=1)
        dd, jj = np.nonzero(~held[:, e][:, None] & np.ones((1, slots), dtype=bool))
        g = table[dd, jj]
        ok = spare[g] & (g != e)
        if not ok.any():
            continue
        dd, jj, g = dd[ok], jj[ok], g[ok]
        here = loads[dd] - size[g] + new_e
        at = v[g, dd]
        rest = np.where(at >= first[g], second[g], first[g])
        new_top = np.maximum(rest, here)
        new_sq = squares[g] - np.square(at) + np.square(here)
        cost = (~was[dd, e]).astype(int) - (~was[dd, g]).astype(int)
        k = int(np.lexsort((jj, dd, cost, new_sq, new_top))[0])
        key = ((float(new_top[k]), float(new_sq[k])), int(cost[k]), int(dd[k]), int(jj[k]), e)
        if best is None or key < best:
            best = key
    if best is None:
        return None
    return best[0], best[2], best[3], best[4]


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
