"""Every bundled model compiles with default options on every topology kind.

Each (model, topology) pair runs the search, the expert layout and the placement (the steps that
failed: "130 slots per device but only 128 experts", a 616-device instance that fits no pod);
the whole compiler (tracing, balancing, the Plan IR's checks) runs once per model, the models
spread over the topology kinds so that every kind and every model compiles end to end.
"""

from __future__ import annotations

import pytest

from costmodels.errors import InfeasibleError
from costmodels.topology import get_topology
from planner.compile import DEFAULT_WORKLOAD, CompileOptions, _phase_plan, _requests, compile_report
from planner.frontend.shape import shape_of
from planner.frontend.zoo import bundled_names
from planner.placement import place
from planner.search import search

MODELS = bundled_names()
TINY = [m for m in MODELS if m.startswith("tiny-")]
# one of each topology kind, multi-pod included; local:8 (16 GB CPU processes) holds only the tiny models
TOPOLOGIES = ("cloudmatrix384", "cloudmatrix384:4", "h100-cluster:2", "h800-cluster:2", "h200-cluster:16", "local:8")


def _fits(model: str, topology: str) -> bool:
    return not topology.startswith("local") or model in TINY


@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("model", MODELS)
def test_search_and_placement_succeed(model, topology):
    topo, shape = get_topology(topology), shape_of(model)
    if not _fits(model, topology):
        # what cannot fit says why and what to change, never a placement or balancer failure
        with pytest.raises(InfeasibleError, match=r"weights alone need .* GB|no memory-feasible .* at 8 devices|best reachable TPOT .* relax --tpot-ms"):
            search(shape, topo, DEFAULT_WORKLOAD, mode="auto")
        return
    sr = search(shape, topo, DEFAULT_WORKLOAD, mode="auto")
    phases = [_phase_plan("decode", sr.decode, sr.decode_instances, shape, topo)]
    if sr.prefill is not None:
        phases.insert(0, _phase_plan("prefill", sr.prefill, sr.prefill_instances, shape, topo))
    for pp in phases:
        assert pp.slots <= shape.num_routed_experts  # a device holds an expert once at most
        assert pp.routed * pp.slots >= shape.num_routed_experts
    slots = place(topo, [r for pp in phases for r in _requests(pp)])
    for s in slots:  # no instance spans a pod
        assert len({topo.pod_of(d) for d in s.devices}) == 1, s.id
    idle = sr.slice.devices - sr.devices_used
    assert idle >= 0
    assert bool(sr.notes) == (idle > 0)  # idle devices are explained, and only then
    if sr.notes:
        assert sr.notes[0].startswith(f"{idle} idle: ")


# every model compiles end to end once; the tiny ones take local:8, the rest cycle through the others
_BIG = [m for m in MODELS if m not in TINY]
_OTHERS = [t for t in TOPOLOGIES if not t.startswith("local")]
END_TO_END = [(m, _OTHERS[i % len(_OTHERS)]) for i, m in enumerate(_BIG)] + [(m, "local:8") for m in TINY]


def test_end_to_end_covers_every_model_and_topology_kind():
    assert {m for m, _ in END_TO_END} == set(MODELS)
    assert {t for _, t in END_TO_END} == set(TOPOLOGIES)


@pytest.mark.parametrize("model,topology", END_TO_END, ids=[f"{m}-{t}" for m, t in END_TO_END])
def test_compiles_with_default_options(model, topology):
    plan, sr = compile_report(model, topology, CompileOptions())
    assert plan.feasible
    assert sr.mode in ("agg", "disagg") and len(sr.modes) == 2
    assert (plan.prefill is None) == (sr.mode == "agg")
    used = sum(len(p.devices) for p in plan.phases.values())
    assert used <= plan.topology.num_devices
