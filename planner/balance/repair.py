"""Repair: an old expert layout made valid for new devices and replica counts, moving few replicas.

Used by `planner.balance.migrate` as one of its candidates (the others relabel or re-pack the fresh
layout). Steps are those of the README section "podplan replan": 3a frees surplus replicas, 3b
places missing ones, 3c polishes by re-partitioning the most loaded device with another.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

# Polishing exchanges k experts between the most loaded device and another one; k grows while the
# number of exchange patterns per device pair stays below this (S = 4: all 70; S = 8: single swaps).
_MAX_PATTERNS = 300

_REL = 1e-12  # relative tolerance when comparing loads


def repair(load: np.ndarray, survivors: Sequence[Sequence[int]] | np.ndarray, counts: np.ndarray,
           target: float) -> np.ndarray | None:
    """A layout [D, S] with replica `counts` that keeps most of `survivors` and loads no device above `target`
    if it can (else as low as the local search gets); None when the counts cannot be placed.

    load: [E] tokens; survivors: per device d of the new layout, the experts it held before (S of
    them, or none for a fresh device; experts whose replicas all sat on failed devices are missing);
    counts: [E] replicas (sum D * S, each <= D).
    Step 3a frees surplus replicas on the most loaded devices; 3b places missing replicas, heaviest
    first, on the lightest device with a free slot; 3c re-partitions the experts of the most
    loaded device and another one while the max (then the sum of squares) drops, fewest moves first.
    """
    D = len(survivors)
    S = int(counts.sum()) // D
    E = load.shape[0]
    size = load / np.maximum(counts, 1)
    old = [[int(e) for e in row] for row in survivors]
    # Free slots: those a device did not hold before, and second copies of one expert on a device
    # (an EPLB layout may have them).
    table = np.zeros((D, S), dtype=np.int64)
    free = np.ones((D, S), dtype=bool)
    for d, row in enumerate(old):
        for j, e in enumerate(row[:S]):
            if e not in row[:j]:
                table[d, j], free[d, j] = e, False
    have = np.bincount(table[~free], minlength=E)
    projected = np.where(free, 0.0, size[table]).sum(axis=1)
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
    return _polish(size, table, old, target)


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


def _polish(size: np.ndarray, table: np.ndarray, old: list[list[int]], target: float) -> np.ndarray:
    """Step 3c: re-partition the top device with another while (max, sum of squares) drops."""
    table = table.copy()
    D, S = table.shape
    if D < 2:
        return table
    was = np.zeros((D, size.shape[0]), dtype=bool)
    for d, row in enumerate(old):
        was[d, row] = True
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


def keep_positions(experts: np.ndarray, old_row: Sequence[int] | np.ndarray) -> np.ndarray:
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
