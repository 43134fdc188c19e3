"""Our EPLB re-implementation: the reference's conformance example and its invariants."""

from __future__ import annotations

import numpy as np
import pytest

from costmodels.errors import InputError
from planner.balance.eplb import eplb

# The conformance example of DeepSeek's EPLB README (github.com/deepseek-ai/EPLB).
WEIGHT = np.array([
    [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
    [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
])
PHY2LOG = [
    [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
    [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
]


def test_conformance_example_hierarchical():
    result = eplb(WEIGHT, slots=16, groups=4, nodes=2, gpus=8)
    assert result.phy2log.tolist() == PHY2LOG
    assert result.logcnt.tolist() == [
        [1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1],
        [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1],
    ]


def _check_maps(result, slots):
    layers, experts = result.logcnt.shape
    assert result.logcnt.sum(axis=1).tolist() == [slots] * layers
    for layer in range(layers):
        for e in range(experts):
            where = [s for s in result.log2phy[layer, e] if s >= 0]
            assert len(where) == result.logcnt[layer, e]
            assert all(result.phy2log[layer, s] == e for s in where)


def test_maps_agree_and_every_expert_is_placed():
    result = eplb(WEIGHT, slots=16, groups=4, nodes=2, gpus=8)
    _check_maps(result, 16)
    assert set(result.phy2log[0]) == set(range(12))


def test_hierarchical_keeps_groups_on_one_node():
    result = eplb(WEIGHT, slots=16, groups=4, nodes=2, gpus=8)
    for layer in range(2):
        node_of_slot = np.arange(16) // 8
        for group in range(4):
            members = range(group * 3, group * 3 + 3)
            nodes = {int(node_of_slot[s]) for s, e in enumerate(result.phy2log[layer]) if e in members}
            assert len(nodes) == 1


def test_global_when_groups_do_not_divide_over_nodes():
    # 3 groups on 2 nodes: the hierarchy does not apply, EPLB falls back to one node.
    weight = WEIGHT[:, :12]
    fallback = eplb(weight, slots=16, groups=3, nodes=2, gpus=8)
    plain = eplb(weight, slots=16, groups=1, nodes=1, gpus=8)
    assert fallback.phy2log.tolist() == plain.phy2log.tolist()
    _check_maps(plain, 16)


def test_replicate_gives_spare_slots_to_the_heaviest_per_replica():
    result = eplb(np.array([[100.0, 10.0, 10.0, 10.0]]), slots=8, groups=1, nodes=1, gpus=4)
    assert result.logcnt.tolist() == [[5, 1, 1, 1]]


def test_bad_inputs_raise_one_line_errors():
    with pytest.raises(InputError, match="slots must be >= experts"):
        eplb(WEIGHT, slots=8, groups=1, nodes=1, gpus=8)
    with pytest.raises(InputError, match="nodes"):
        eplb(WEIGHT, slots=16, groups=4, nodes=3, gpus=8)
    with pytest.raises(InputError, match="groups"):
        eplb(WEIGHT, slots=16, groups=5, nodes=1, gpus=8)
    with pytest.raises(InputError, match=r"\[layers, experts\]"):
        eplb(WEIGHT[0], slots=16, groups=1, nodes=1, gpus=8)
