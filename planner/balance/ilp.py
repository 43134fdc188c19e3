"""OR-Tools models of the balancer: the weighted-split LP and the exact equal-split CP-SAT.

GLOP solves the shares of a fixed layout (a small LP, always optimal). CP-SAT solves
small sub-problems exactly (replica counts and placement together) and proves a bound;
large ones are left to `planner.balance.search`, where CP-SAT was measured to lose
(see docs/balancer.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ortools.linear_solver import pywraplp
from ortools.sat.python import cp_model

from costmodels.errors import InfeasibleError

# Literal budget of the exact CP-SAT model (experts x devices x replica-count options).
# Measured (docs/balancer.md): up to ~500 literals CP-SAT proves optimality or
# improves the search within 1 s; from ~1000 on it never improved it nor lifted the bound.
EXACT_MAX_LITERALS = 600

# Integer scale of CP-SAT loads: the largest per-replica load maps to this many units,
# so rounding moves a device load by at most slots/2 units (< 1e-5 relative).
_SCALE_UNITS = 1_000_000


def weighted_shares(load: np.ndarray, table: np.ndarray) -> tuple[np.ndarray, float]:
    """Shares [D, S] (fraction of the slot's expert load, each expert summing to 1) that
    minimise the largest device load of a fixed layout, and that load (tokens). GLOP LP:
    min T s.t. sum of an expert's slot loads = its load, sum on a device <= T."""
    devices, slots = table.shape
    mean = float(load.sum()) / devices
    counts = np.bincount(table.reshape(-1), minlength=load.shape[0])
    if mean <= 0:
        return 1.0 / counts[table], 0.0
    scaled = load / mean  # loads near 1 keep GLOP's tolerances relative
    solver = pywraplp.Solver.CreateSolver("GLOP")
    top = solver.NumVar(0.0, solver.infinity(), "T")
    x = [[solver.NumVar(0.0, solver.infinity(), f"x{d}_{j}") for j in range(slots)] for d in range(devices)]
    by_expert: dict[int, list[pywraplp.Variable]] = {}
    for d in range(devices):
        solver.Add(solver.Sum(x[d]) <= top)
        for j in range(slots):
            by_expert.setdefault(int(table[d, j]), []).append(x[d][j])
    for e, slots_of in sorted(by_expert.items()):
        solver.Add(solver.Sum(slots_of) == float(scaled[e]))
    solver.Minimize(top)
    if solver.Solve() != pywraplp.Solver.OPTIMAL:
        raise InfeasibleError("balance: the weighted-share LP found no optimum; report this layout as a bug")
    amount = np.array([[max(v.solution_value(), 0.0) for v in row] for row in x])
    shares = np.empty_like(amount)
    for e, _ in sorted(by_expert.items()):
        mask = table == e
        total = amount[mask].sum()
        # An idle expert (load 0) splits evenly: any split is optimal, this one is stable.
        shares[mask] = amount[mask] / total if total > 0 else 1.0 / counts[e]
    loads = (shares * load[table]).sum(axis=1)
    return shares, float(loads.max())


@dataclass(frozen=True)
class ExactResult:
    """One CP-SAT solve: the best table found (or None), a proven bound (tokens), optimality."""

    table: np.ndarray | None
    bound: float
    optimal: bool


def exact_literals(experts: int, devices: int, slots: int) -> int:
    """Size of the exact model: one literal per (expert, device, replica count)."""
    options = min(devices, devices * slots - experts + 1)
    return experts * devices * options


def exact_equal(
    load: np.ndarray,
    devices: int,
    slots: int,
    *,
    hint: np.ndarray | None,
    time_limit: float,
    seed: int,
) -> ExactResult:
    """Solve replica counts and placement together with CP-SAT, equal split.

    load: [E] tokens. Literals p[e,d,k]: expert e has k replicas and one sits on device
    d, carrying load[e] / k there; y[e,k] picks e's count, and sum_d p[e,d,k] = k y[e,k]
    ties the two (tighter than linking a placement and a count literal by products).
    Devices are interchangeable, so their loads are ordered to break symmetry.
    Deterministic: one worker, a fixed seed, a deterministic time limit in seconds.
    """
    experts = load.shape[0]
    top_k = min(devices, devices * slots - experts + 1)
    peak = float(load.max())
    if peak <= 0:
        table = hint if hint is not None else _any_layout(experts, devices, slots)
        return ExactResult(table=table, bound=0.0, optimal=True)
    scale = _SCALE_UNITS / peak
    ks = range(1, top_k + 1)
    q = {(e, k): int(round(load[e] / k * scale)) for e in range(experts) for k in ks}

    m = cp_model.CpModel()
    y = {(e, k): m.new_bool_var(f"y{e}_{k}") for e in range(experts) for k in ks}
    p = {(e, d, k): m.new_bool_var(f"p{e}_{d}_{k}") for e in range(experts) for d in range(devices) for k in ks}
    for e in range(experts):
        m.add_exactly_one(y[e, k] for k in ks)
        for k in ks:
            m.add(sum(p[e, d, k] for d in range(devices)) == k * y[e, k])
        for d in range(devices):
            m.add_at_most_one(p[e, d, k] for k in ks)  # never two replicas on one device
    top = m.new_int_var(0, slots * _SCALE_UNITS, "T")
    dev_load = []
    for d in range(devices):
        m.add(sum(p[e, d, k] for e in range(experts) for k in ks) == slots)
        v = m.new_int_var(0, slots * _SCALE_UNITS, f"L{d}")
        m.add(v == sum(q[e, k] * p[e, d, k] for e in range(experts) for k in ks))
        m.add(v <= top)
        dev_load.append(v)
    for d in range(devices - 1):
        m.add(dev_load[d] >= dev_load[d + 1])
    m.minimize(top)

    if hint is not None:
        _add_hint(m, hint, load, y, p, ks)
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    solver.parameters.random_seed = seed % 2**31  # CP-SAT takes an int32; seeds below 2**31 stay as they were
    solver.parameters.max_deterministic_time = max(time_limit, 0.01)
    status = solver.solve(m)
    bound = max((solver.best_objective_bound - slots / 2) / scale, 0.0)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return ExactResult(table=None, bound=bound, optimal=False)
    table = np.zeros((devices, slots), dtype=np.int64)
    for d in range(devices):
        table[d] = [e for e in range(experts) if any(solver.value(p[e, d, k]) for k in ks)]
    return ExactResult(table=table, bound=bound, optimal=status == cp_model.OPTIMAL)


def _any_layout(experts: int, devices: int, slots: int) -> np.ndarray:
    """A valid layout for an all-zero layer: slot j of the sorted replica list on device j mod D."""
    replicas = np.arange(devices * slots) % experts
    return np.sort(replicas).reshape(slots, devices).T.copy()


def _add_hint(m: cp_model.CpModel, hint: np.ndarray, load: np.ndarray, y: dict, p: dict, ks: range) -> None:
    """Hint a known layout, devices reordered by load (the symmetry-breaking order)."""
    counts = np.bincount(hint.reshape(-1), minlength=load.shape[0])
    loads = (load / np.maximum(counts, 1))[hint].sum(axis=1)
    order = np.argsort(-loads, kind="stable")
    held = {(int(e), d) for d, row in enumerate(hint[order]) for e in row}
    for (e, k), var in y.items():
        m.add_hint(var, counts[e] == k)
    for (e, d, k), var in p.items():
        m.add_hint(var, (e, d) in held and counts[e] == k)
