"""Fast numpy search for one balancing sub-problem: replica counts, packing, local moves.

A sub-problem is one layer (or one node of a layer): `load` [E] tokens per expert,
D devices with S slots each. A layout is a table [D, S] of expert ids, each expert at
least once, never twice on one device. `planner.balance.balancer` drives these steps.
"""

from __future__ import annotations

import bisect
import heapq

import numpy as np

# Relative tolerance when comparing device loads: below it two loads are "equal".
_EPS = 1e-12


def replicate_counts(load: np.ndarray, slots: int, cap: int) -> np.ndarray:
    """Replica counts [E] minimising the largest load per replica (EPLB's Replicate, capped).

    Each expert gets one replica; each further slot goes to the largest load/count among
    experts below `cap` replicas (ties: lowest id). Optimal for min max load/count.
    """
    experts = load.shape[0]
    counts = np.ones(experts, dtype=np.int64)
    heap = [(-float(load[e]), e) for e in range(experts) if cap > 1]
    heapq.heapify(heap)
    for _ in range(slots - experts):
        if not heap:
            break  # every expert at the cap: callers keep slots <= E * cap
        _, e = heapq.heappop(heap)
        counts[e] += 1
        if counts[e] < cap:
            heapq.heappush(heap, (-float(load[e]) / counts[e], e))
    return counts


def lower_bound(load: np.ndarray, devices: int, slots_per_device: int) -> float:
    """A bound no layout beats, equal or weighted split: max(mean, best per-replica load).

    Some device holds a replica of the expert with the largest load per replica, and the
    capped Replicate makes that value as small as it can be; the mean is the other floor.
    """
    counts = replicate_counts(load, devices * slots_per_device, devices)
    return max(float(load.sum()) / devices, float((load / counts).max()))


def equal_split_bound(load: np.ndarray, devices: int, slots: int, ceiling: float) -> float:
    """A stronger bound for the equal split: the device holding the largest item also
    holds S - 1 others, each at least the smallest item of the layout.

    For a largest item lam (a breakpoint load[e] / k), every expert needs
    ceil(load / lam) replicas; the spare slots can shrink the smallest item at best to
    min_e load[e] / (need[e] + spare). The bound is the least lam + (S - 1) * that over
    breakpoints in [best per-replica load, ceiling]; above `ceiling` it cannot matter.
    """
    slots_total = devices * slots
    floor = float((load / replicate_counts(load, slots_total, devices)).max())
    if slots < 2 or floor <= 0:
        return floor
    ks = np.arange(1, devices + 1)
    lams = np.unique((load[:, None] / ks[None, :]).reshape(-1))
    lams = lams[(lams >= floor * (1 - _EPS)) & (lams <= ceiling * (1 + _EPS))]
    best = ceiling
    for chunk in np.array_split(lams, max(1, lams.size // 512)):
        if chunk.size == 0:
            continue
        need = np.maximum(1, np.ceil(load[None, :] / chunk[:, None] - _EPS))  # [n, E]
        spare = slots_total - need.sum(axis=1)
        ok = spare >= 0
        if not ok.any():
            continue
        need, spare, lam = need[ok], spare[ok], chunk[ok]
        smallest = (load[None, :] / np.minimum(devices, need + spare[:, None])).min(axis=1)
        best = min(best, float((lam + (slots - 1) * smallest).min()))
    return max(floor, best)


def table_loads(load: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Device loads [D] of a layout under the equal split (tokens)."""
    counts = np.bincount(table.reshape(-1), minlength=load.shape[0])
    return (load / np.maximum(counts, 1))[table].sum(axis=1)


def _rounds_loads(sizes: np.ndarray, devices: int, slots: int) -> np.ndarray:
    """Surrogate packing: S rounds, each giving the next D largest items to the lightest.

    Exact for S = 2 (sorted pairing is optimal there); a fast estimate for S > 2.
    sizes: [R] or [n, R] items; returns device loads [D] or [n, D].
    """
    rows = np.sort(sizes, axis=-1)[..., ::-1].reshape(*sizes.shape[:-1], slots, devices)
    loads = rows[..., 0, :].copy()
    for k in range(1, slots):
        loads = np.sort(loads, axis=-1) + rows[..., k, :]
    return loads


def _scores(load: np.ndarray, counts: np.ndarray, devices: int, slots: int) -> np.ndarray:
    """Surrogate (max, sum of squares) of count vectors counts [n, E] -> [n, 2]."""
    sizes = load[None, :] / counts
    items = np.repeat(sizes.reshape(-1), counts.reshape(-1)).reshape(counts.shape[0], -1)
    loads = _rounds_loads(items, devices, slots)
    return np.stack([loads.max(axis=-1), np.square(loads).sum(axis=-1)], axis=1)


def improve_counts(
    load: np.ndarray, counts: np.ndarray, devices: int, slots: int, *, max_iters: int = 400, width: int = 12
) -> np.ndarray:
    """Move replicas between experts while the surrogate packing's (max, sum of squares) drops.

    A move takes one replica from expert g and gives it to expert e. Candidates: e among
    the `width` largest items, g among the cheapest to merge and the largest items; all
    candidates of a step are scored in one batch and the best one is taken.
    """
    counts = counts.copy()
    best = tuple(_scores(load, counts[None, :], devices, slots)[0])
    for _ in range(max_iters):
        size = load / counts
        grow = [e for e in np.argsort(-size, kind="stable") if counts[e] < devices][:width]
        many = np.flatnonzero(counts > 1)
        merged = load[many] / (counts[many] - 1)
        shrink = list(dict.fromkeys(
            list(many[np.argsort(merged, kind="stable")[:width]])
            + list(many[np.argsort(-size[many], kind="stable")[:width]])
        ))
        moves = [(e, g) for e in grow for g in shrink if g != e]
        if not moves:
            break
        batch = np.repeat(counts[None, :], len(moves), axis=0)
        idx = np.arange(len(moves))
        batch[idx, [m[0] for m in moves]] += 1
        batch[idx, [m[1] for m in moves]] -= 1
        scores = _scores(load, batch, devices, slots)
        # Lexicographic (max, sum of squares); the first of equal candidates wins.
        pick = int(np.lexsort((idx, scores[:, 1], scores[:, 0]))[0])
        if tuple(scores[pick]) >= best:
            break
        best = tuple(scores[pick])
        counts = batch[pick]
    return counts


def target_counts(load: np.ndarray, devices: int, slots: int, target: float, small: float) -> np.ndarray:
    """Counts aimed at device load `target`: fewest replicas of hot experts, then split
    the largest items no bigger than `small` * target until every slot is used.

    The opposite corner from Replicate (which splits hot experts as far as it can): it
    leaves room to pair big items with many small ones.
    """
    counts = np.minimum(np.maximum(1, np.ceil(load / target - _EPS)), devices).astype(np.int64)
    while counts.sum() > devices * slots:
        many = np.flatnonzero(counts > 1)
        counts[many[np.argmin(load[many] / (counts[many] - 1))]] -= 1
    while counts.sum() < devices * slots:
        size = load / counts
        open_ = counts < devices
        pick = open_ & (size <= small * target)
        if not pick.any():
            pick = open_
        counts[int(np.argmax(np.where(pick, size, -1.0)))] += 1
    return counts


def _pair_deficit(load: np.ndarray, counts: np.ndarray, target: float) -> tuple[int, int, float, float]:
    """Hall check for S = 2: every item above target/2 needs its own partner <= target - item.

    Returns (worst deficit, total deficit, size of the binding big item, its partner limit).
    """
    size = load / counts
    big = size > target / 2
    bigs = np.sort(np.repeat(size[big], counts[big]))[::-1]
    if bigs.size == 0:
        return 0, 0, 0.0, target
    smalls = np.sort(np.repeat(size[~big], counts[~big]))
    have = np.searchsorted(smalls, target - bigs + _EPS * target, side="right")
    deficit = np.arange(1, bigs.size + 1) - have
    k = int(np.argmax(deficit))
    return int(deficit[k]), int(np.maximum(deficit, 0).sum()), float(bigs[k]), float(target - bigs[k])


def pair_counts(load: np.ndarray, devices: int, target: float) -> np.ndarray | None:
    """Counts for S = 2 whose sorted pairing stays within `target`, or None if greedy fails.

    Start from the fewest replicas (load / target, rounded up); while a big item lacks a
    partner, add the one replica (of the binding expert, or of one of the three smallest
    items above its limit) that shrinks the deficit most; spare slots split small items.
    """
    counts = np.maximum(1, np.ceil(load / target - _EPS)).astype(np.int64)
    if (counts > devices).any():
        return None
    while True:
        worst, _, big, limit = _pair_deficit(load, counts, target)
        if worst <= 0:
            break
        if counts.sum() >= 2 * devices:
            return None
        size = load / counts
        options = set(np.flatnonzero(np.isclose(size, big, rtol=1e-12, atol=0) & (counts < devices)).tolist())
        above = np.flatnonzero((size > limit) & (size <= target / 2) & (counts < devices))
        options.update(above[np.argsort(size[above], kind="stable")[:3]].tolist())
        best = None
        for e in sorted(options):
            counts[e] += 1
            key = (*_pair_deficit(load, counts, target)[:2], e)
            counts[e] -= 1
            if best is None or key < best:
                best = key
        if best is None:
            return None
        counts[best[2]] += 1
    while counts.sum() < 2 * devices:
        # Spare slots split the small expert with the fewest replicas (largest first):
        # piling them on one expert fills the middle of the pairing with its own
        # replicas, which would have to pair with each other (measured: worse layouts).
        size = load / counts
        pick = (counts < devices) & (size <= target / 2)
        if not pick.any():
            return None
        rank = np.where(pick, counts * (1.0 + size.max()) - size, np.inf)
        counts[int(np.argmin(rank))] += 1
    return counts


def pair_search(load: np.ndarray, devices: int, low: float, high: float, *, tol: float = 5e-4) -> np.ndarray | None:
    """Bisect the S = 2 target between a bound and a known load with `pair_counts`.

    Returns the counts whose duplicate-free layout is best. The sorted pairing is that
    layout unless it pairs an expert with itself; only then is the layout built to judge.
    When the greedy fails just below `high` it is not tried lower (a failed greedy runs
    to the last slot, the costly case; measured on hot:K loads, it then never won).
    """
    best, best_peak = None, np.inf
    first = True
    while high - low > tol * max(low, _EPS):
        mid = high * (1 - tol) if first else (low + high) / 2
        first = False
        counts = pair_counts(load, devices, mid)
        if counts is None:
            if best is None:
                return None
            low = mid
            continue
        reached = float(_rounds_loads(np.repeat(load / counts, counts), devices, 2).max())
        peak = reached
        if _self_pairs(load, counts, devices):
            peak = float(table_loads(load, layout_from_counts(load, counts, devices, 2)).max())
        if peak < best_peak:
            best, best_peak = counts, peak
        high = min(mid, reached)
    return best


def _self_pairs(load: np.ndarray, counts: np.ndarray, devices: int) -> bool:
    """True when the sorted pairing puts two replicas of one expert on one device."""
    size = load / counts
    replicas = np.repeat(np.arange(load.shape[0]), counts)
    replicas = replicas[np.lexsort((replicas, -size[replicas]))]
    return bool((replicas[:devices] == replicas[2 * devices - 1 : devices - 1 : -1]).any())


def place_rounds(load: np.ndarray, counts: np.ndarray, devices: int, slots: int) -> np.ndarray:
    """Pack replicas in S rounds: each round deals the next D largest to the lightest devices,
    skipping a device that already holds the expert. Returns a table [D, S] (may hold a
    duplicate when a round has no other choice; `fix_duplicates` removes it)."""
    size = load / counts
    replicas = np.repeat(np.arange(load.shape[0]), counts)
    replicas = replicas[np.lexsort((replicas, -size[replicas]))]
    table = np.zeros((devices, slots), dtype=np.int64)
    held: list[set[int]] = [set() for _ in range(devices)]
    loads = np.zeros(devices)
    for k in range(slots):
        free = list(np.argsort(loads, kind="stable"))
        for e in replicas[k * devices : (k + 1) * devices]:
            at = next((i for i, d in enumerate(free) if e not in held[d]), 0)
            d = free.pop(at)
            table[d, k] = e
            held[d].add(int(e))
            loads[d] += size[e]
    return table


def place_columns(counts: np.ndarray, devices: int, slots: int) -> np.ndarray:
    """A layout that always exists when every count <= D: replicas expert by expert, slot
    j on device j mod D, so an expert's consecutive replicas land on distinct devices."""
    replicas = np.repeat(np.arange(counts.shape[0]), counts)
    return replicas.reshape(slots, devices).T.copy()


def has_duplicates(table: np.ndarray) -> bool:
    """True when some device holds two replicas of one expert."""
    ordered = np.sort(table, axis=1)
    return bool((ordered[:, 1:] == ordered[:, :-1]).any())


def fix_duplicates(load: np.ndarray, table: np.ndarray) -> np.ndarray | None:
    """Swap away every second replica of an expert on one device (least-harm swap first)."""
    table = table.copy()
    devices, slots = table.shape
    counts = np.bincount(table.reshape(-1), minlength=load.shape[0])
    size = load / np.maximum(counts, 1)
    for d in range(devices):
        for i in range(slots):
            e = table[d, i]
            if e not in table[d, :i]:
                continue
            loads = size[table].sum(axis=1)
            best = None
            for d2 in range(devices):
                if d2 == d or e in table[d2]:
                    continue
                for j in range(slots):
                    f = table[d2, j]
                    if f in table[d]:
                        continue
                    worst = max(loads[d] - size[e] + size[f], loads[d2] - size[f] + size[e])
                    if best is None or worst < best[0]:
                        best = (worst, d2, j)
            if best is None:
                return None
            _, d2, j = best
            table[d, i], table[d2, j] = table[d2, j], e
    return table


def swap_search(load: np.ndarray, table: np.ndarray, *, max_iters: int = 20000) -> np.ndarray:
    """Swap two replicas between the most loaded device and another while its load drops.

    Each step takes the best swap for the current maximum; stops when that device has
    no improving swap. Never creates a duplicate; replica counts are unchanged.
    """
    table = table.copy()
    devices, slots = table.shape
    counts = np.bincount(table.reshape(-1), minlength=load.shape[0])
    size = load / np.maximum(counts, 1)
    item = size[table]
    loads = item.sum(axis=1)
    held = np.zeros((devices, load.shape[0]), dtype=bool)
    held[np.arange(devices)[:, None], table] = True
    owner = np.repeat(np.arange(devices), slots)
    for _ in range(max_iters):
        d = int(np.argmax(loads))
        top = loads[d]
        flat_e = table.reshape(-1)
        flat_s = item.reshape(-1)
        best, pick = top * (1 - 1e-12), None
        for i in range(slots):
            x, ex = item[d, i], table[d, i]
            ok = (flat_s < x) & (owner != d) & ~held[owner, ex] & ~held[d, flat_e]
            new = np.maximum(top - x + flat_s, loads[owner] - flat_s + x)
            new = np.where(ok, new, np.inf)
            j = int(np.argmin(new))
            if new[j] < best:
                best, pick = new[j], (i, j)
        if pick is None:
            break
        i, j = pick
        swap_slots(table, item, held, loads, d, i, *divmod(j, slots))
    return table


def swap_slots(table: np.ndarray, item: np.ndarray, held: np.ndarray, loads: np.ndarray,
               d: int, i: int, d2: int, i2: int) -> None:
    """Exchange slot i of device d with slot i2 of device d2, keeping the bookkeeping in step.

    table [D, S] expert ids, item [D, S] per-slot loads, held [D, E] which experts a device holds,
    loads [D] device loads; all updated in place.
    """
    ex, ey = table[d, i], table[d2, i2]
    table[d, i], table[d2, i2] = ey, ex
    item[d, i], item[d2, i2] = item[d2, i2], item[d, i]
    held[d, ex], held[d, ey], held[d2, ey], held[d2, ex] = False, True, False, True
    loads[d], loads[d2] = item[d].sum(), item[d2].sum()


def layout_from_counts(load: np.ndarray, counts: np.ndarray, devices: int, slots: int) -> np.ndarray:
    """Pack counts into a duplicate-free table and polish it with `swap_search`."""
    table = place_rounds(load, counts, devices, slots)
    if has_duplicates(table):
        fixed = fix_duplicates(load, table)
        table = fixed if fixed is not None else place_columns(counts, devices, slots)
    return swap_search(load, table)


def chain_pairs(load: np.ndarray, devices: int, target: float) -> np.ndarray | None:
    """S = 2 layout for the weighted split: hot experts as a chain of runs, cold ones as partners.

    Experts below `target` are cold, the rest hot. Hot experts are cut into runs; device
    by device, the current run gives `target - cold` to the next cold partner, or, when
    it cannot, its tail shares the device with the head of a run of another hot expert.
    Every device then carries `target` under suitable shares. Tries run counts near
    D - colds + 1; returns the first table that uses every expert, or None.
    """
    hot = [int(e) for e in np.argsort(-load, kind="stable") if load[e] >= target]
    cold = sorted((int(e) for e in range(load.shape[0]) if load[e] < target), key=lambda e: (load[e], e))
    if not hot:
        return None
    start = max(len(hot), devices - len(cold) + 1)
    # Every device full needs exactly D - colds + 1 runs when each cold sits with a run;
    # measured on Zipf loads the first success is within two of that count.
    for offset in range(0, 8):
        for runs in (start + offset, start - offset) if offset else (start,):
            if len(hot) <= runs < min(2 * devices, len(hot) * devices + 1):
                table = _chain(load, devices, target, hot, cold, runs)
                if table is not None:
                    return table
    return None


def _chain(
    load: np.ndarray, devices: int, target: float, hot: list[int], cold: list[int], runs: int
) -> np.ndarray | None:
    """One attempt of `chain_pairs` with `runs` runs in total."""
    pieces = replicate_counts(load[hot], runs, devices)  # runs per hot expert, by load
    left = pieces.copy()
    colds = list(cold)
    cold_load = [float(load[e]) for e in colds]
    tol = 1e-9 * target

    def next_run(prev: int, need: float) -> tuple[int, float] | None:
        # Prefer a run long enough to fill the device, from the expert with most runs left.
        best, best_key = -1, None
        for i, e in enumerate(hot):
            if left[i] == 0 or e == prev:
                continue
            length = load[e] / pieces[i]
            key = (length >= need - tol, left[i], length, -i)
            if best_key is None or key > best_key:
                best, best_key = i, key
        if best < 0:
            return None
        left[best] -= 1
        return hot[best], float(load[hot[best]] / pieces[best])

    table: list[tuple[int, int]] = []
    e, rest = -1, 0.0
    while len(table) < devices:
        if rest <= tol:
            nxt = next_run(e, target)
            if nxt is None:
                break
            e, rest = nxt
        if colds and rest >= target - cold_load[-1] - tol:
            # A cold partner: the largest while the run is long, else the one that ends it.
            j = len(colds) - 1 if rest >= target else bisect.bisect_left(cold_load, target - rest - tol)
            f = colds.pop(j)
            cold_load.pop(j)
            table.append((e, f))
            rest = max(rest - (target - load[f]), 0.0)
            continue
        nxt = next_run(e, target - rest)
        if nxt is None:
            if colds:
                table.append((e, colds.pop(0)))
                cold_load.pop(0)
                rest = 0.0
            break
        e2, run = nxt
        table.append((e, e2))
        e, rest = e2, max(run - (target - rest), 0.0)
    if len(table) != devices or colds or left.sum() or rest > tol:
        return None
    return np.array(table, dtype=np.int64)
