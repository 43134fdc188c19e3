"""Fuzz the plan loader: >= 1,000 mutated plans, each loaded or rejected with one PlanError line, never a crash."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planner.ir.errors import PlanError
from planner.ir.plan import from_json
from tests.plan_factory import tiny_plan


@pytest.fixture(scope="module")
def base_text() -> str:
    # a small plan with every optional part filled: shared experts, weighted shares, two phases, frontier
    return tiny_plan("tiny-deepseek-v3", weighted=True, decode_mode="disaggregated", attention_devices=3).to_json()


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.sampled_from([10**400, -(10**400), 2**63]) | st.floats()
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


def _slots(doc) -> list[tuple[object, object]]:
    """Every (container, key) in the document, depth first."""
    out, stack = [], [doc]
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            out.append((node, k))
            stack.append(v)
    return out


def _mutate(doc, data) -> None:
    slots = _slots(doc)
    parent, key = slots[data.draw(st.integers(0, len(slots) - 1), label="slot")]
    value = parent[key]
    how = data.draw(st.sampled_from(["replace", "delete", "nudge", "grow", "shrink", "add-key", "swap"]), label="how")
    if how == "replace":
        parent[key] = data.draw(JSON_VALUES, label="value")
    elif how == "delete":
        del parent[key]
    elif how == "nudge" and isinstance(value, (int, float)) and not isinstance(value, bool):
        delta = data.draw(st.sampled_from([-300, -2, -1, 1, 2, 255, 0.5, -0.5, 10**400]), label="delta")
        try:
            parent[key] = (int(value) if isinstance(delta, int) else value) + delta
        except OverflowError:  # a huge int from an earlier mutation plus a float
            parent[key] = delta
    elif how == "grow" and isinstance(value, list) and value:
        value.append(copy.deepcopy(value[data.draw(st.integers(0, len(value) - 1), label="dup")]))
    elif how == "shrink" and isinstance(value, list) and value:
        value.pop(data.draw(st.integers(0, len(value) - 1), label="drop"))
    elif how == "add-key" and isinstance(value, dict):
        value[data.draw(st.text(max_size=8), label="key")] = data.draw(JSON_VALUES, label="value")
    elif how == "swap" and isinstance(value, list) and len(value) > 1:
        i, j = data.draw(st.integers(0, len(value) - 1)), data.draw(st.integers(0, len(value) - 1))
        value[i], value[j] = value[j], value[i]
    else:
        parent[key] = data.draw(JSON_VALUES, label="value")


def _load_or_reject(text: str) -> bool:
    """True if loaded; False if rejected with one PlanError line; anything else fails the test."""
    try:
        plan = from_json(text)
    except PlanError as exc:
        msg = str(exc)
        assert msg and "\n" not in msg and "Traceback" not in msg, msg
        return False
    assert from_json(plan.to_json()) == plan  # whatever loads is canonical and round-trips
    return True


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_mutated_plans_load_or_fail_in_one_line(base_text, data):
    doc = json.loads(base_text)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        _mutate(doc, data)
    _load_or_reject(json.dumps(doc))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_damaged_bytes_fail_in_one_line(base_text, data):
    cut = data.draw(st.integers(0, len(base_text)), label="cut")
    kind = data.draw(st.sampled_from(["truncate", "flip", "insert"]), label="kind")
    if kind == "truncate":
        text = base_text[:cut]
    elif kind == "flip":
        text = base_text[:cut] + data.draw(st.characters(), label="char") + base_text[cut + 1:]
    else:
        text = base_text[:cut] + data.draw(st.text(max_size=4), label="ins") + base_text[cut:]
    _load_or_reject(text)


def test_the_unmutated_plan_loads(base_text):
    assert _load_or_reject(base_text)


@pytest.mark.parametrize("path,value", [
    (("decode", "predictions", "step_ms"), 10**400),  # float() overflow
    (("model", "num_routed_experts"), 10**12),  # must not allocate per expert
    (("decode", "experts", 0, "slots_per_device"), 10**9),
    (("topology", "num_devices"), 10**15),
    (("model", "moe_layers"), [1, 2, 10**20]),
    (("provenance", "options"), {"deep": [[[[[[[[[[1]]]]]]]]]]}),
])
def test_hostile_values_are_rejected_in_one_line(base_text, path, value):
    doc = json.loads(base_text)
    node = doc
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    assert _load_or_reject(json.dumps(doc)) is False
