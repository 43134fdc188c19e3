"""Expert replication and placement: the balancer the planner calls for every phase.

`balance(loads [L, E], devices, slots_per_device, ...)` returns a `BalanceResult` with
`phy2log` [L, D*S] (slot s on device s // S; device d on node d // (D / N)) and the
numbers to trust it: device loads, max/mean, a proven lower bound, the gap, and the
DeepSeek-EPLB baseline's max/mean on the same input. Steps are numbered as in the
explanation of docs/balancer.md.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from costmodels.errors import InputError
from planner.balance import ilp as balance_ilp
from planner.balance import search as balance_search
from planner.balance.migrate import Migration, migrate, moved_slots
from planner.balance.eplb import eplb
from planner.balance.loads import check_loads

ALGORITHMS = ("ilp", "eplb")
SPLITS = ("equal", "weighted")

# Deterministic seconds CP-SAT may spend on one sub-problem (a layer, or a node of one);
# only sub-problems small enough for the exact model use it (balance_ilp.EXACT_MAX_LITERALS).
DEFAULT_TIME_LIMIT = 1.0

# Default tolerance of a migration-aware solve: keep a layout that moves fewer slots
# if its max load is within this fraction of the best layout found from scratch.
DEFAULT_MIGRATION_SLACK = 0.01

# A gap below this counts as proven optimal (CP-SAT loads are integers scaled to 1e6).
_OPTIMAL_GAP = 1e-5


@dataclass(frozen=True)
class BalanceResult:
    """The balancer's answer for every layer, plus what it costs and how good it is.

    Arrays: phy2log [L, D*S] expert per slot; log2phy [L, E, X] slots per expert (-1
    padded); logcnt [L, E] replicas; shares [L, D*S] fraction of the slot's expert load
    (weighted split only, else None); device_loads [L, D] tokens; max_over_mean [L];
    bound [L] tokens no layout can beat; gap [L] = max / bound - 1; eplb_max_over_mean [L]
    and eplb_duplicates [L] (devices where EPLB put two replicas of one expert);
    moved_slots [L] slots whose expert changed against `previous` (else None).
    """

    algorithm: str
    split: str
    devices: int
    slots_per_device: int
    nodes: int
    groups: int
    mode: str
    seed: int
    time_limit: float
    phy2log: np.ndarray
    log2phy: np.ndarray
    logcnt: np.ndarray
    shares: np.ndarray | None
    device_loads: np.ndarray
    max_over_mean: np.ndarray
    bound: np.ndarray
    gap: np.ndarray
    status: tuple[str, ...]
    source: tuple[str, ...]
    eplb_max_over_mean: np.ndarray
    eplb_duplicates: np.ndarray
    moved_slots: np.ndarray | None
    wall_time: float = field(compare=False)

    @property
    def layers(self) -> int:
        return int(self.phy2log.shape[0])

    @property
    def experts(self) -> int:
        return int(self.logcnt.shape[1])

    def totals(self) -> dict[str, Any]:
        """Summary over layers: mean and worst max/mean, ours and EPLB's, worst gap."""
        out: dict[str, Any] = {
            "max_over_mean_avg": _r(self.max_over_mean.mean()),
            "max_over_mean_worst": _r(self.max_over_mean.max()),
            "eplb_max_over_mean_avg": _r(self.eplb_max_over_mean.mean()),
            "eplb_max_over_mean_worst": _r(self.eplb_max_over_mean.max()),
            "eplb_duplicate_devices": int(self.eplb_duplicates.sum()),
            "bound_over_mean_avg": _r(np.mean(_ratio(self.bound, self.device_loads.mean(axis=1)))),
            "gap_worst": _r(self.gap.max()),
            "layers_optimal": sum(s == "optimal" for s in self.status),
            "status": "optimal" if all(s == "optimal" for s in self.status) else "feasible",
        }
        if self.moved_slots is not None:
            out["moved_slots"] = int(self.moved_slots.sum())
        return out

    def to_dict(self, *, timing: bool = False) -> dict[str, Any]:
        """Canonical JSON form: sorted keys when dumped, floats rounded; wall time only
        under "timing" when asked, so the same inputs give byte-identical files."""
        means = self.device_loads.mean(axis=1)
        per_layer = []
        for layer in range(self.layers):
            entry = {
                "layer": layer,
                "device_loads": [_r(v, 3) for v in self.device_loads[layer]],
                "max": _r(self.device_loads[layer].max(), 3),
                "mean": _r(means[layer], 3),
                "max_over_mean": _r(self.max_over_mean[layer]),
                "bound": _r(self.bound[layer], 3),
                "bound_over_mean": _r(_ratio(self.bound[layer], means[layer])),
                "gap": _r(self.gap[layer]),
                "status": self.status[layer],
                "source": self.source[layer],
                "eplb_max_over_mean": _r(self.eplb_max_over_mean[layer]),
                "eplb_duplicate_devices": int(self.eplb_duplicates[layer]),
            }
            if self.moved_slots is not None:
                entry["moved_slots"] = int(self.moved_slots[layer])
            per_layer.append(entry)
        out: dict[str, Any] = {
            "schema": "podplan.balance/1",
            "algorithm": self.algorithm,
            "split": self.split,
            "mode": self.mode,
            "devices": self.devices,
            "slots_per_device": self.slots_per_device,
            "nodes": self.nodes,
            "groups": self.groups,
            "seed": self.seed,
            "time_limit": self.time_limit,
            "layers": self.layers,
            "experts": self.experts,
            "phy2log": self.phy2log.tolist(),
            "log2phy": self.log2phy.tolist(),
            "logcnt": self.logcnt.tolist(),
            "per_layer": per_layer,
            "totals": self.totals(),
        }
        if self.shares is not None:
            out["shares"] = [_round_shares(self.phy2log[layer], self.shares[layer]) for layer in range(self.layers)]
        if timing:
            out["timing"] = {"wall_s": round(self.wall_time, 3)}
        return out


def _r(value: float, digits: int = 6) -> float:
    return float(round(float(value), digits))


def _ratio(num: Any, den: Any) -> Any:
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)


def _round_shares(row: np.ndarray, shares: np.ndarray) -> list[float]:
    """Shares to 6 decimals with every expert's shares still summing to exactly 1."""
    out = np.round(shares, 6)
    for e in np.unique(row):
        slots = np.flatnonzero(row == e)
        out[slots[-1]] = round(1.0 - float(out[slots[:-1]].sum()), 6)
    return [float(v) for v in out]


@dataclass(frozen=True)
class _Layer:
    """One layer's solution: table [D, S] (global expert ids), shares [D, S] or None."""

    table: np.ndarray
    shares: np.ndarray | None
    bound: float
    source: str
    proven: bool


def balance(
    loads: np.ndarray,
    devices: int,
    slots_per_device: int,
    *,
    nodes: int = 1,
    groups: int = 1,
    algorithm: str = "ilp",
    split: str = "equal",
    previous: np.ndarray | Sequence[Sequence[int]] | None = None,
    previous_devices: Sequence[int] | None = None,
    migration_slack: float = DEFAULT_MIGRATION_SLACK,
    time_limit: float = DEFAULT_TIME_LIMIT,
    seed: int = 0,
    workers: int | None = None,
) -> BalanceResult:
    """Replicate and place experts for every layer, minimising the largest device load.

    loads: [L, E] tokens per expert per step. devices D, slots_per_device S: R = D*S
    slots per layer, each device holding S distinct experts. nodes N / groups G: with
    G % N == 0 and G > 1, group locality (each node serves whole expert groups, as
    EPLB's hierarchical policy); else one global problem. split: "equal" (an expert's
    tokens split evenly over its replicas) or "weighted" (per-slot shares, solved as an
    LP). previous: a phy2log [L, D'*S'] to stay close to (fewest moved slots within
    `migration_slack` of the best max load); previous_devices[d] is the old index of new
    device d (-1: a fresh device), default identity. time_limit: deterministic CP-SAT
    seconds per sub-problem. Same inputs and seed give the same result for any `workers`.
    """
    started = time.perf_counter()
    loads = check_loads(loads)
    layers, experts = loads.shape
    _check(devices, slots_per_device, nodes, groups, algorithm, split, time_limit, seed, migration_slack, experts)
    hierarchical = groups > 1 and groups % nodes == 0
    if hierarchical and slots_per_device > experts // nodes:
        raise InputError(
            f"balance: {slots_per_device} slots per device exceed the {experts // nodes} experts a node "
            "serves under group locality; use fewer slots or --groups 1"
        )
    old = _previous(previous, previous_devices, layers, experts, devices, slots_per_device)

    # Step 1: the EPLB baseline on the same input (hierarchical when G % N == 0).
    base = eplb(loads, devices * slots_per_device, groups, nodes, devices)
    base_tables = base.phy2log.reshape(layers, devices, slots_per_device)

    jobs = [
        _Job(loads[layer], base_tables[layer], devices, slots_per_device, nodes if hierarchical else 1,
             groups if hierarchical else 1, algorithm, split, time_limit, seed + layer,
             None if old is None else old[layer], migration_slack)
        for layer in range(layers)
    ]
    solved = _run(jobs, workers)

    tables = np.stack([s.table for s in solved])
    phy2log = tables.reshape(layers, -1)
    counts = np.stack([np.bincount(row, minlength=experts) for row in phy2log])
    shares = None
    if split == "weighted":
        rows = []
        for s in solved:
            assert s.shares is not None, "every layer solved with split='weighted' carries its shares"
            rows.append(s.shares.reshape(-1))
        shares = np.stack(rows)
        slot_load = shares * np.take_along_axis(loads, phy2log, axis=1)
    else:
        slot_load = np.take_along_axis(loads / np.maximum(counts, 1), phy2log, axis=1)
    device_loads = slot_load.reshape(layers, devices, slots_per_device).sum(axis=2)
    means = loads.sum(axis=1) / devices
    peak = device_loads.max(axis=1)
    bound = np.minimum(np.array([s.bound for s in solved]), peak)
    gap = np.where(bound > 0, peak / np.where(bound > 0, bound, 1.0) - 1.0, 0.0)
    status = tuple(
        "optimal" if (s.proven or g <= _OPTIMAL_GAP) and algorithm == "ilp" else "feasible"
        for s, g in zip(solved, gap)
    )
    base_loads = np.take_along_axis(loads / np.maximum(base.logcnt, 1), base.phy2log, axis=1)
    base_peak = base_loads.reshape(layers, devices, slots_per_device).sum(axis=2).max(axis=1)
    moved = None
    if old is not None:
        moved = np.array([moved_slots(tables[layer], old[layer]) for layer in range(layers)])
    return BalanceResult(
        algorithm=algorithm,
        split=split,
        devices=devices,
        slots_per_device=slots_per_device,
        nodes=nodes,
        groups=groups,
        mode="hierarchical" if hierarchical else "global",
        seed=seed,
        time_limit=float(time_limit),
        phy2log=phy2log,
        log2phy=_log2phy(phy2log, counts),
        logcnt=counts,
        shares=shares,
        device_loads=device_loads,
        max_over_mean=_ratio(peak, means),
        bound=bound,
        gap=gap,
        status=status,
        source=tuple(s.source for s in solved),
        eplb_max_over_mean=_ratio(base_peak, means),
        eplb_duplicates=np.array([_duplicate_devices(t) for t in base_tables]),
        moved_slots=moved,
        wall_time=time.perf_counter() - started,
    )


def _check(devices, slots, nodes, groups, algorithm, split, time_limit, seed, slack, experts) -> None:  # noqa: ANN001
    if algorithm not in ALGORITHMS:
        raise InputError(f"balance: unknown algorithm {algorithm!r}; use one of {', '.join(ALGORITHMS)}")
    if split not in SPLITS:
        raise InputError(f"balance: unknown split {split!r}; use one of {', '.join(SPLITS)}")
    for name, value in (("devices", devices), ("slots per device", slots), ("nodes", nodes), ("groups", groups)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise InputError(f"balance: {name} must be an integer >= 1 (got {value!r})")
    if devices * slots < experts:
        raise InputError(
            f"balance: {devices} devices x {slots} slots = {devices * slots} slots cannot hold "
            f"{experts} experts; every expert needs a slot, add devices or slots"
        )
    if slots > experts:
        raise InputError(
            f"balance: {slots} slots per device but only {experts} experts; a device may not hold "
            "two replicas of one expert, use at most one slot per expert"
        )
    if devices % nodes:
        raise InputError(f"balance: {devices} devices do not split over {nodes} nodes; use a divisor")
    if experts % groups:
        raise InputError(f"balance: {experts} experts do not split into {groups} groups; use a divisor")
    if not np.isfinite(time_limit) or time_limit < 0:
        raise InputError(f"balance: time limit must be >= 0 seconds (got {time_limit})")
    if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise InputError(f"balance: seed must be an integer in 0..4294967295 (got {seed!r})")
    if not np.isfinite(slack) or slack < 0:
        raise InputError(f"balance: migration slack must be >= 0 (got {slack})")


def _previous(previous, previous_devices, layers, experts, devices, slots) -> list[list[tuple[int, ...]]] | None:  # noqa: ANN001
    """The old layout as the expert ids each new device held, per layer [L][D], or None.

    previous: phy2log [L, D' * S] with the same slots per device S (old device o owns
    slots o*S .. o*S + S - 1). previous_devices[d]: old index of new device d, -1 for a
    fresh one; default: new device d was old device d (fresh when d >= D').
    """
    if previous is None:
        return None
    try:
        raw = np.asarray(previous, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError("balance: previous phy2log is not a numeric [layers, slots] matrix") from None
    if raw.ndim != 2 or raw.shape[0] != layers or raw.shape[1] % slots:
        raise InputError(
            f"balance: previous phy2log has shape {raw.shape}; expected [{layers} layers, "
            f"a multiple of {slots} slots per device]"
        )
    if raw.size and (raw.min() < 0 or raw.max() >= experts or (raw != np.round(raw)).any()):
        raise InputError(f"balance: previous phy2log holds ids outside 0..{experts - 1}; pass this model's layout")
    old = raw.astype(np.int64).reshape(layers, -1, slots)
    old_count = old.shape[1]
    mapping = list(previous_devices) if previous_devices is not None else [
        d if d < old_count else -1 for d in range(devices)
    ]
    if len(mapping) != devices or any(not -1 <= int(o) < old_count for o in mapping):
        raise InputError(
            f"balance: previous_devices needs {devices} entries, each an old device 0..{old_count - 1} or -1"
        )
    return [
        [tuple(int(e) for e in old[layer, o]) if o >= 0 else () for o in map(int, mapping)]
        for layer in range(layers)
    ]


def _duplicate_devices(table: np.ndarray) -> int:
    ordered = np.sort(table, axis=1)
    return int((ordered[:, 1:] == ordered[:, :-1]).any(axis=1).sum())


def _log2phy(phy2log: np.ndarray, counts: np.ndarray) -> np.ndarray:
    layers, experts = counts.shape
    out = np.full((layers, experts, int(counts.max())), -1, dtype=np.int64)
    for layer in range(layers):
        rank = np.zeros(experts, dtype=np.int64)
        for slot, e in enumerate(phy2log[layer]):
            out[layer, e, rank[e]] = slot
            rank[e] += 1
    return out


@dataclass(frozen=True)
class _Job:
    """One layer's (or one node's) sub-problem; `eplb_table` [D, S] is a start, if any."""

    load: np.ndarray
    eplb_table: np.ndarray | None
    devices: int
    slots: int
    nodes: int
    groups: int
    algorithm: str
    split: str
    time_limit: float
    seed: int
    previous: list[tuple[int, ...]] | None
    slack: float


# Called with (layers solved, layers) as each layer of a balance() call is solved, when a caller set it
# (the CLI's progress line with an ETA); a context variable so that compile and replan need not thread it.
LAYER_PROGRESS: ContextVar[Callable[[int, int], None] | None] = ContextVar("LAYER_PROGRESS", default=None)


def _run(jobs: list[_Job], workers: int | None) -> list[_Layer]:
    """Solve layers, in worker processes when asked; results do not depend on `workers`."""
    report = LAYER_PROGRESS.get()
    if workers is None:
        workers = min(os.cpu_count() or 1, len(jobs)) if len(jobs) >= 8 else 1
    if workers <= 1 or len(jobs) <= 1:
        out = []
        for job in jobs:
            out.append(_solve_layer(job))
            if report is not None:
                report(len(out), len(jobs))
        return out
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method),
                             initializer=_ignore_sigint) as pool:
        out = []
        for layer in pool.map(_solve_layer, jobs, chunksize=max(1, len(jobs) // (4 * workers))):
            out.append(layer)
            if report is not None:
                report(len(out), len(jobs))
        return out


def _ignore_sigint() -> None:
    """Ctrl-C reaches every process of the terminal's group: the parent stops the pool, and the
    workers stay quiet instead of each printing a KeyboardInterrupt traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _solve_layer(job: _Job) -> _Layer:
    """One layer: EPLB as is, or our search per node; then the shares and migration."""
    if job.algorithm == "eplb":
        table = job.eplb_table
        assert table is not None, "balance() gives every layer job EPLB's table"
        bound = balance_search.lower_bound(job.load, job.devices, job.slots)
        shares = balance_ilp.weighted_shares(job.load, table)[0] if job.split == "weighted" else None
        return _Layer(table=table, shares=shares, bound=bound, source="eplb", proven=False)
    if job.nodes > 1:
        best = _solve_hierarchical(job)
    else:
        best = _solve_global(job)
    if job.previous is None:
        return best
    # Step 7: migration: the fewest moved slots within the slack of the best max load.
    picked: Migration = migrate(
        job.load, best.table, job.previous, nodes=job.nodes, split=job.split, slack=job.slack,
        reference=_peak(job.load, best.table, best.shares),
    )
    shares = picked.shares if job.split == "weighted" else None
    source = best.source if picked.source == "relabel" else picked.source
    return _Layer(table=picked.table, shares=shares, bound=best.bound, source=source, proven=best.proven)


def _peak(load: np.ndarray, table: np.ndarray, shares: np.ndarray | None) -> float:
    if shares is None:
        return float(balance_search.table_loads(load, table).max())
    return float((shares * load[table]).sum(axis=1).max())


def _solve_global(job: _Job) -> _Layer:
    """Steps 2-6 on one sub-problem (a whole layer, or one node's experts and devices)."""
    load, devices, slots = job.load, job.devices, job.slots
    # Step 2: the bound: max(mean device load, best possible load per replica).
    bound = balance_search.lower_bound(load, devices, slots)
    # Step 3: candidate layouts. EPLB's own (duplicates swapped away) keeps us never
    # worse than EPLB whenever EPLB is duplicate-free; then replica counts from several
    # starts, each improved on the surrogate packing, packed, and polished by swaps.
    if job.split == "weighted" and slots == 2:
        # Step 6 first for S = 2: the chain usually reaches the bound, making the rest moot.
        chained = _chain_shares(load, devices, bound)
        if chained is not None and chained[0] <= bound * (1 + _OPTIMAL_GAP):
            return _Layer(table=chained[1], shares=chained[2], bound=bound, source="chain+lp", proven=True)
    candidates: list[tuple[np.ndarray, str]] = []
    start = job.eplb_table
    if start is not None and balance_search.has_duplicates(start):
        start = balance_search.fix_duplicates(load, start)
    if start is not None:
        candidates.append((balance_search.swap_search(load, start), "eplb+swap"))
    # Measured on Zipf/hot/uniform loads at 256 experts: for S >= 3 the best layout came
    # from one of these four starts; for S = 2 the target starts never won (Step 4 does).
    starts = [balance_search.replicate_counts(load, devices * slots, devices)]
    if slots > 2:
        for over, small in ((1.0, 1.0 / slots), (1.0, 0.5), (1.05, 1.0 / slots)):
            starts.append(balance_search.target_counts(load, devices, slots, bound * over, small))
    for counts in _unique(starts):
        counts = balance_search.improve_counts(load, counts, devices, slots)
        candidates.append((balance_search.layout_from_counts(load, counts, devices, slots), "search"))
    if slots == 2:
        # Step 4: S = 2 pairs big items with small partners; bisect the target load.
        ceiling = min(float(balance_search.table_loads(load, t).max()) for t, _ in candidates)
        paired = balance_search.pair_search(load, devices, bound, ceiling)
        if paired is not None:
            candidates.append((balance_search.layout_from_counts(load, paired, devices, slots), "pairs"))
    table, source = min(candidates, key=lambda c: _key(load, c[0]))
    if job.split == "equal":
        ceiling = float(balance_search.table_loads(load, table).max())
        bound = max(bound, balance_search.equal_split_bound(load, devices, slots, ceiling))
    proven = False
    # Step 5: small sub-problems go to CP-SAT whole, hinted with the best layout.
    literals = balance_ilp.exact_literals(load.shape[0], devices, slots)
    if job.time_limit > 0 and literals <= balance_ilp.EXACT_MAX_LITERALS:
        exact = balance_ilp.exact_equal(load, devices, slots, hint=table, time_limit=job.time_limit, seed=job.seed)
        bound = max(bound, exact.bound)
        if exact.table is not None and _key(load, exact.table) < _key(load, table):
            table, source = exact.table, "cp-sat"
        proven = exact.optimal
    if job.split == "equal":
        return _Layer(table=table, shares=None, bound=bound, source=source, proven=proven)
    # Step 6: weighted split: LP shares on the best layout; for S = 2 also the chain.
    shares, peak = balance_ilp.weighted_shares(load, table)
    if slots == 2:
        chained = _chain_shares(load, devices, bound)
        if chained is not None and chained[0] < peak * (1 - 1e-12):
            peak, table, shares = chained
            source = "chain"
    return _Layer(table=table, shares=shares, bound=bound, source=source + "+lp", proven=False)


def _chain_shares(load: np.ndarray, devices: int, bound: float) -> tuple[float, np.ndarray, np.ndarray] | None:
    """The S = 2 chain layout at the bound (or slightly above) with its LP shares."""
    for over in (1.0, 1.001, 1.003, 1.01):
        table = balance_search.chain_pairs(load, devices, bound * over)
        if table is not None:
            shares, peak = balance_ilp.weighted_shares(load, table)
            return peak, table, shares
    return None


def _solve_hierarchical(job: _Job) -> _Layer:
    """Group locality: whole expert groups per node, each node a sub-problem (Steps 2-6).

    Two group-to-node assignments are solved, EPLB's and a balanced repack of it; the
    layer keeps the one with the lower max device load.
    """
    eplb_table = job.eplb_table
    assert eplb_table is not None, "balance() gives every layer job EPLB's table"
    experts = job.load.shape[0]
    group_size = experts // job.groups
    per_node_devices = job.devices // job.nodes
    group_load = job.load.reshape(job.groups, group_size).sum(axis=1)
    eplb_assign = _eplb_groups(eplb_table, group_size, per_node_devices, job.groups)
    repacked = _repack_groups(group_load, eplb_assign, job.nodes)
    # EPLB's node layout is a start only under EPLB's own group assignment.
    best = _solve_nodes(job, eplb_assign, eplb_table)
    if not np.array_equal(repacked, eplb_assign):
        other = _solve_nodes(job, repacked, None)
        if other[0] < best[0] * (1 - 1e-12):
            best = other
    peak, table, shares, sources = best
    # Group locality only adds constraints: the bounds of the whole layer still hold, and
    # the node serving the heaviest group carries it plus G/N - 1 groups at least as heavy
    # as the lightest, on D/N devices.
    bound = balance_search.lower_bound(job.load, job.devices, job.slots)
    per_node_groups = job.groups // job.nodes
    heaviest = group_load.max() + (per_node_groups - 1) * group_load.min()
    bound = max(bound, float(heaviest) / per_node_devices)
    if job.split == "equal":
        bound = max(bound, balance_search.equal_split_bound(job.load, job.devices, job.slots, peak))
    return _Layer(table=table, shares=shares, bound=bound, source="/".join(sorted(set(sources))), proven=False)


def _solve_nodes(job: _Job, assign: np.ndarray,
                 eplb_table: np.ndarray | None) -> tuple[float, np.ndarray, np.ndarray | None, list[str]]:
    """One group-to-node assignment [G]: each node's experts on its devices, a sub-problem each.

    Returns (max device load, table [D, S], shares [D, S] or None, sources); `eplb_table` [D, S]
    seeds each node's search, or None.
    """
    group_size = job.load.shape[0] // job.groups
    per_node_devices = job.devices // job.nodes
    table = np.zeros((job.devices, job.slots), dtype=np.int64)
    shares = np.zeros((job.devices, job.slots)) if job.split == "weighted" else None
    sources = []
    for node in range(job.nodes):
        members = np.concatenate([
            np.arange(g * group_size, (g + 1) * group_size) for g in np.flatnonzero(assign == node)
        ])
        rows = slice(node * per_node_devices, (node + 1) * per_node_devices)
        start = np.searchsorted(members, eplb_table[rows]) if eplb_table is not None else None
        sub = _Job(job.load[members], start, per_node_devices, job.slots, 1, 1, job.algorithm, job.split,
                   job.time_limit, job.seed, None, job.slack)
        part = _solve_global(sub)
        table[rows] = members[part.table]
        if shares is not None:
            shares[rows] = part.shares
        sources.append(part.source)
    return _peak(job.load, table, shares), table, shares, sources


def _eplb_groups(table: np.ndarray, group_size: int, per_node_devices: int, groups: int) -> np.ndarray:
    """The node EPLB gave each group: the node of the devices holding its experts."""
    assign = np.zeros(groups, dtype=np.int64)
    for d, row in enumerate(table):
        assign[row // group_size] = d // per_node_devices
    return assign


def _repack_groups(group_load: np.ndarray, start: np.ndarray, nodes: int) -> np.ndarray:
    """Swap groups between the heaviest node and another while the heaviest gets lighter."""
    assign = start.copy()
    for _ in range(len(assign) ** 2):
        node_load = np.bincount(assign, weights=group_load, minlength=nodes)
        top = int(np.argmax(node_load))
        best, pick = node_load[top] * (1 - 1e-12), None
        for a in np.flatnonzero(assign == top):
            for b in np.flatnonzero(assign != top):
                diff = group_load[a] - group_load[b]
                if diff <= 0:
                    continue
                worst = max(node_load[top] - diff, node_load[assign[b]] + diff)
                if worst < best:
                    best, pick = worst, (a, b)
        if pick is None:
            break
        a, b = pick
        assign[a], assign[b] = assign[b], assign[a]
    return assign


def _key(load: np.ndarray, table: np.ndarray) -> tuple[float, float]:
    loads = balance_search.table_loads(load, table)
    return float(loads.max()), float(np.square(loads).sum())


def _unique(arrays: list[np.ndarray]) -> list[np.ndarray]:
    seen, out = set(), []
    for a in arrays:
        key = a.tobytes()
        if key not in seen:
            seen.add(key)
            out.append(a)
    return out
