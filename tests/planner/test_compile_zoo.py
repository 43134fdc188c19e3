"""Every bundled model compiles with default options on every topology kind.

Each (model, topology) pair runs the search, the expert layout and the placement (the steps that
failed: "130 slots per device but only 128 experts", a 616-device instance that fits no pod);
the whole compiler (tracing, balancing, the Plan IR's checks) runs once per model and once per
topology kind, the small models included on the large topologies (point 6 of issue 16: a model too
small for a topology is replicated, or leaves devices idle, and the summary says which).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from costmodels.errors import InfeasibleError
from costmodels.hardware import dtype_bytes
from costmodels.topology import FAMILIES, get_topology
from planner.compile import DEFAULT_WORKLOAD, CompileOptions, _phase_plan, _requests, compile_report
from planner.frontend.shape import shape_of
from planner.frontend.zoo import bundled_names
from planner.placement import place
from planner.search import search

MODELS = bundled_names()
TINY = [m for m in MODELS if m.startswith("tiny-")]
# one of each topology kind (costmodels.topology.FAMILIES; a test below keeps the list complete), multi-pod
# included; sizes where every model fits at the hardware's default precision, except the one-host kinds
# (h100:8 holds 640 GB) and local:8 (16 GB CPU processes: the tiny models only)
TOPOLOGIES = ("cloudmatrix384", "cloudmatrix384:4", "h100-cluster:2", "h800-cluster:2", "h200-cluster:16",
              "a100-cluster:8", "b200-cluster:2", "gb200-nvl72:1", "h100:8", "h200:8", "local:8")


def _workload(topology: str):
    """What `podplan compile` serves with default options: the default workload at the hardware's precision."""
    return replace(DEFAULT_WORKLOAD, quant=get_topology(topology).hardware.default_quant)


def _fits(model: str, topology: str) -> bool:
    """Whether the model can be served at all: its weights fit in the topology's memory (CPU processes:
    the tiny models only, the others are far too slow for the TPOT target)."""
    if topology.startswith("local"):
        return model in TINY
    topo, shape = get_topology(topology), shape_of(model)
    weights_gb = shape.params_total * dtype_bytes(_workload(topology).quant) / 1e9
    return weights_gb < topo.num_devices * topo.hardware.chip_hbm_gb


def test_every_topology_kind_is_covered():
    assert {get_topology(t).kind for t in TOPOLOGIES} == {f.kind for f in FAMILIES}


@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("model", MODELS)
def test_search_and_placement_succeed(model, topology):
    topo, shape, wl = get_topology(topology), shape_of(model), _workload(topology)
    if not _fits(model, topology):
        # what cannot fit says why and what to change, never a placement or balancer failure
        with pytest.raises(InfeasibleError, match=r"weights alone need .* GB|no memory-feasible .* at 8 devices|best reachable TPOT .* relax --tpot-ms"):
            search(shape, topo, wl, mode="auto")
        return
    sr = search(shape, topo, wl, mode="auto")
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
    idle_notes = [n for n in sr.notes if " idle: " in n]
    assert len(idle_notes) == (idle > 0)  # idle devices are explained, and only then
    if idle_notes:
        assert idle_notes[0].startswith(f"{idle} idle: ")
    # a model that fits on one device, served by many replicas, says so and how many devices it uses
    weights_gb = shape.params_total * dtype_bytes(wl.quant) / 1e9
    replicated = max(sr.decode_instances, sr.prefill_instances) > 1
    small = [n for n in sr.notes if " is small " in n]
    assert len(small) == (weights_gb < topo.hardware.chip_hbm_gb and replicated)
    if small:
        assert small[0].endswith(f"using {sr.devices_used} of {sr.slice.devices} devices")


# every model compiles end to end once: the big ones cycle through the topologies that hold them, the
# tiny ones take local:8 (runnable there) and every kind the big ones left out (small on large topologies)
_BIG = [m for m in MODELS if m not in TINY]
_OTHERS = [t for t in TOPOLOGIES if not t.startswith("local")]


def _end_to_end() -> list[tuple[str, str]]:
    pairs = []
    for i, m in enumerate(_BIG):
        ring = _OTHERS[i % len(_OTHERS):] + _OTHERS[:i % len(_OTHERS)]
        pairs.append((m, next(t for t in ring if _fits(m, t))))
    pairs += [(m, "local:8") for m in TINY]
    left = [t for t in _OTHERS if t not in {t for _, t in pairs}]
    pairs += [(TINY[i % len(TINY)], t) for i, t in enumerate(left)]
    return pairs + [("tiny-mixtral", "cloudmatrix384")]  # 384 replicas of a one-device model


END_TO_END = _end_to_end()


def test_end_to_end_covers_every_model_and_topology_kind():
    assert {m for m, _ in END_TO_END} == set(MODELS)
    assert {t for _, t in END_TO_END} == set(TOPOLOGIES)


@pytest.mark.parametrize("model,topology", END_TO_END, ids=[f"{m}-{t}" for m, t in END_TO_END])
def test_compiles_with_default_options(model, topology):
    plan, sr = compile_report(model, topology, CompileOptions(workload=_workload(topology)))
    assert plan.feasible
    assert sr.mode in ("agg", "disagg") and len(sr.modes) == 2
    assert (plan.prefill is None) == (sr.mode == "agg")
    used = sum(len(p.devices) for p in plan.phases.values())
    assert used <= plan.topology.num_devices
    # the plan records the search: both modes, the chosen one first and why it won
    assert plan.search is not None and plan.search.chosen.mode == sr.mode
    assert {m.mode for m in plan.search.modes} == {"agg", "disagg"} and plan.search.why == sr.why
    if used < plan.topology.num_devices:  # fewer devices than the topology has: the plan says why
        assert any(" idle: " in n or " is small " in n for n in plan.search.notes)
