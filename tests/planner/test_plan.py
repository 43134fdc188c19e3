"""The Plan IR: canonical JSON, round trips, validation with JSON paths, schema file, atomic writes."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from costmodels.errors import PodplanError
from planner.ir.errors import PlanError
from planner.ir import fileio
from planner.ir import plan as plan_mod
from planner.ir.plan import (
    SCHEMA_VERSION,
    LayerPlacement,
    ModeChoice,
    Plan,
    SearchRecord,
    device_ranges,
    devices_of,
    from_dict,
    from_json,
    load_plan,
    write_plan,
)
from tests.conftest import ROOT
from tests.plan_factory import deepseek_v3_plan, synthetic_plan, tiny_plan


@pytest.fixture(scope="module")
def tiny() -> Plan:
    return tiny_plan("tiny-deepseek-v3")


@pytest.fixture(scope="module")
def dsv3() -> Plan:
    return deepseek_v3_plan()


def _doc(plan: Plan) -> dict:
    return json.loads(plan.to_json())


def _error(doc: dict) -> str:
    with pytest.raises(PlanError) as exc:
        from_json(json.dumps(doc))
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


# --- canonical form and round trips ---------------------------------------------------------------


def test_round_trip_is_exact(tiny, dsv3):
    for p in (tiny, dsv3):
        text = p.to_json()
        back = from_json(text)
        assert back == p
        assert back.to_json() == text


def test_canonical_json_is_sorted_compact_and_rounded(dsv3):
    text = dsv3.to_json()
    doc = json.loads(text)
    assert doc["schema_version"] == SCHEMA_VERSION
    # sorted keys at every level: re-dumping with sort_keys keeps the key order
    assert list(doc) == sorted(doc)
    assert list(doc["decode"]["instances"][0]) == sorted(doc["decode"]["instances"][0])
    # one MoE layer's slots are one line, not one line per slot
    assert text.count("\n") < 10_000
    assert len(text) < 1_000_000  # DeepSeek-V3 on 384 devices stays a reviewable file
    # floats have at most 6 significant digits
    shares = [x for lp in doc["decode"]["experts"][0]["layers"] for x in lp["device_loads"]]
    assert all(len(repr(x).replace(".", "").replace("-", "").lstrip("0").split("e")[0]) <= 7 for x in shares)
    assert "NaN" not in text and "Infinity" not in text


def test_same_inputs_give_byte_identical_files(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    write_plan(tiny_plan(seed=5), a)
    write_plan(tiny_plan(seed=5), b)
    assert a.read_bytes() == b.read_bytes()
    write_plan(tiny_plan(seed=6), b)
    assert a.read_bytes() != b.read_bytes()


def test_floats_are_rounded_on_construction():
    lp = LayerPlacement(layer=1, phy2log=(0, 1), device_loads=(1 / 3, 2 / 3))
    assert lp.device_loads == (0.333333, 0.666667)
    assert LayerPlacement(layer=1, phy2log=[0, 1], device_loads=[-0.0, 1]).device_loads == (0.0, 1.0)


@settings(max_examples=60, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12))
def test_rounding_is_idempotent(x):
    r = plan_mod._round(x)
    assert plan_mod._round(r) == r
    assert abs(r - x) <= abs(x) * 1e-5 + 1e-300


def test_numpy_values_are_accepted_as_ints_and_floats():
    lp = LayerPlacement(layer=np.int64(3), phy2log=np.array([1, 0, 1]), shares=np.array([0.5, 1.0, 0.5]))
    assert lp.layer == 3 and lp.phy2log == (1, 0, 1) and type(lp.phy2log[0]) is int
    assert json.dumps(lp.to_dict())  # plain JSON types only


# --- validation names the JSON path ---------------------------------------------------------------


def test_expert_out_of_range_names_the_path(dsv3):
    doc = _doc(dsv3)
    doc["decode"]["experts"][0]["layers"][17]["phy2log"][3] = 300
    assert _error(doc) == "plan.decode.experts[0].layers[17].phy2log[3]: expert 300 out of range 0..255"


@pytest.mark.parametrize("mutate,expected", [
    (lambda d: d.pop("model"), "plan.model: missing required field of Plan"),
    (lambda d: d.__setitem__("extra", 1), "plan.extra: unknown field"),
    (lambda d: d["model"].__setitem__("top_k", "8"), "plan.model.top_k: expected an integer, got the string '8'"),
    (lambda d: d["model"].__setitem__("top_k", True), "plan.model.top_k: expected an integer, got a boolean"),
    (lambda d: d["model"].__setitem__("config_sha256", "abc"), "plan.model.config_sha256: expected 64 lowercase hex"),
    (lambda d: d["decode"]["instances"][0].__setitem__("mode", "mixed"),
     "plan.decode.instances[0].mode: the string 'mixed' is not one of colocated, disaggregated"),
    (lambda d: d["decode"]["instances"][0]["devices"].append(0),
     "plan.decode.instances[0].devices[160]: device 0 has no role"),
    (lambda d: d["decode"]["instances"][0].__setitem__("ep", 7), "plan.decode.instances[0].ep: ep 7 != dies"),
    (lambda d: d["decode"]["instances"][0].__setitem__("experts", 3),
     "plan.decode.instances[0].experts: placement 3 out of range 0..0"),
    (lambda d: d["decode"]["experts"][0]["layers"][0]["phy2log"].pop(),
     "plan.decode.experts[0].layers[0].phy2log: 319 slots, expected devices x slots_per_device = 320"),
    (lambda d: d["decode"]["experts"][0]["layers"].pop(),
     "plan.decode.experts[0].layers: covers layers 3-59, expected the MoE layers 3-60"),
    (lambda d: d["decode"]["predictions"].__setitem__("tpot_ms", None),
     "plan.decode.predictions.tpot_ms: a decode phase predicts TPOT"),
    (lambda d: d["decode"]["predictions"].__setitem__("step_ms", float("nan")), "malformed JSON"),
    (lambda d: d["decode"]["memory"]["both"].__setitem__("used_gb", 500.0),
     "plan.decode.memory.both.used_gb: 500.0 GB exceeds capacity 128.0 GB but predictions.feasible is true"),
    (lambda d: d["stages"][9].__setitem__("kind", "dense_ffn"),
     "plan.stages[9].name: 'layer3_routed_experts' for a dense_ffn stage of layer 3: expected 'layer3_dense_ffn'"),
    (lambda d: d["stages"][9].__setitem__("kind", "dense"),
     "plan.stages[9].kind: the string 'dense' is not one of embed, attention"),
    (lambda d: d["model"].__setitem__("moe_layers", list(range(2, 61))),
     "plan.stages[5].kind: layer 2 has no routed_experts stage, which model.moe_layers implies"),
    (lambda d: d["stages"][9].__setitem__("bytes_in_per_token", 1.0),
     "plan.stages[9].bytes_in_per_token: 1.0 but the inputs sum to 114752.0"),
    (lambda d: d["stages"][9].__setitem__("bytes_out_per_token", 1.0),
     "plan.stages[9].bytes_out_per_token: 1.0 but later stages take in 114688.0"),
    (lambda d: d["stages"][9]["inputs"][0].__setitem__("src", "layer5_attention"),
     "plan.stages[9].inputs[0].src: 'layer5_attention' is not an earlier stage"),
    (lambda d: d["stages"].insert(8, d["stages"].pop(9)),
     "plan.stages[8].inputs[1].src: 'layer3_moe_gate' is not an earlier stage"),
    (lambda d: d["stages"].pop(), "plan.stages: expected the staged program: embed first, head last"),
    (lambda d: d["stages"][7].__setitem__("layer", None), "plan.stages[7].layer: stage kind 'attention' needs a decoder layer"),
    (lambda d: d["topology"].__setitem__("num_devices", 100), "plan.topology.num_devices: 100 != devices_per_server"),
    (lambda d: d["prefill"]["instances"][1].__setitem__("id", "prefill-0"), "plan.prefill.instances[1].id: instance id"),
    (lambda d: d["provenance"]["options"].__setitem__("x", {"y": [1, {"z": float("inf")}]}), "malformed JSON"),
    (lambda d: d["frontier"][0].__setitem__("phase", "train"), "plan.frontier[0].phase: the string 'train' is not"),
])
def test_rule_violations_are_one_line_with_path(dsv3, mutate, expected):
    doc = _doc(dsv3)
    mutate(doc)
    assert expected in _error(doc)


def test_device_owned_by_two_instances_of_a_phase(dsv3):
    doc = _doc(dsv3)
    inst = doc["prefill"]["instances"][1]
    inst["devices"][0] = inst["attention_devices"][0] = inst["expert_devices"][0] = inst["shared_expert_devices"][0] = 0
    assert "plan.prefill.instances[1].devices[0]: device 0 already belongs to instance prefill-0" in _error(doc)


def test_every_expert_needs_a_replica(tiny):
    doc = _doc(tiny)
    layer = doc["decode"]["experts"][0]["layers"][0]
    missing = layer["phy2log"][0]
    layer["phy2log"] = [e if e != missing else (missing + 1) % 8 for e in layer["phy2log"]]
    layer["device_loads"] = None
    assert f"expert {missing} has no slot" in _error(doc)


def test_shares_must_sum_to_one_per_expert():
    with pytest.raises(PlanError, match=r"LayerPlacement.shares: the shares of expert 1 sum to 0.9, not 1"):
        LayerPlacement(layer=0, phy2log=(0, 1, 1), shares=(1.0, 0.4, 0.5))
    ok = LayerPlacement(layer=0, phy2log=(0, 1, 1), shares=(1.0, 0.25, 0.75))
    assert ok.log2phy() == {0: (0,), 1: (1, 2)}


def test_python_construction_errors_name_the_class():
    with pytest.raises(PlanError) as exc:
        LayerPlacement(layer=0, phy2log=(0, -1))
    assert str(exc.value) == "LayerPlacement.phy2log[1]: expert -1 is negative"


@pytest.mark.parametrize("version,words", [
    (4, "4 is newer than this podplan reads (3); upgrade podplan"),
    (1, "1 is older than this podplan reads (2) (version 1 had one formula-based stage per layer; version 2 lists "
        "the pass pipeline's stages with measured cut bytes and the passes that ran); recompile it with `podplan compile`"),
    (0, "0 is older than this podplan reads (2); recompile it with `podplan compile`"),
])
def test_schema_version_mismatch(tiny, version, words):
    doc = _doc(tiny)
    doc["schema_version"] = version
    doc["field_from_the_future"] = {}  # the version is reported, not the unknown field
    assert _error(doc) == f"plan.schema_version: {words}"


def test_not_a_plan_at_all():
    assert "plan.schema_version: missing: not a podplan plan" in _error({"hello": 1})
    with pytest.raises(PlanError, match="plan: expected a JSON object, got a list"):
        from_json("[1, 2]")
    with pytest.raises(PlanError, match="malformed JSON at line 1 column 2"):
        from_json("{oops")
    with pytest.raises(PlanError, match='duplicate key "a"'):
        from_json('{"a": 1, "a": 2}')
    with pytest.raises(PlanError, match="malformed JSON"):
        from_json("[" * 100_000)


def test_load_plan_file_errors(tmp_path, tiny):
    missing = tmp_path / "nope.json"
    with pytest.raises(PlanError, match=f"{missing}: no such plan file"):
        load_plan(missing)
    with pytest.raises(PlanError, match="is a directory"):
        load_plan(tmp_path)
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(PlanError, match="not UTF-8"):
        load_plan(binary)
    good = tmp_path / "good.json"
    write_plan(tiny, good)
    assert load_plan(good) == tiny


# --- atomic writes --------------------------------------------------------------------------------


def test_interrupted_write_leaves_no_file(tmp_path, tiny, monkeypatch):
    target = tmp_path / "plan.json"

    def boom(src, dst):
        raise OSError("simulated crash during rename")

    monkeypatch.setattr(fileio.os, "replace", boom)
    with pytest.raises(PodplanError, match="cannot write .*simulated crash during rename"):
        write_plan(tiny, target)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_previous_file(tmp_path, tiny, monkeypatch):
    target = tmp_path / "plan.json"
    write_plan(tiny, target)
    before = target.read_bytes()

    real_fdopen = os.fdopen

    class Half:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, raw):
            self.f.write(raw[: len(raw) // 2])
            raise KeyboardInterrupt  # killed half-way through the bytes

    monkeypatch.setattr(fileio.os, "fdopen", lambda fd, mode: Half(real_fdopen(fd, mode)))
    with pytest.raises(KeyboardInterrupt):
        write_plan(tiny_plan(seed=9), target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]


# --- schema file ----------------------------------------------------------------------------------


def test_shipped_schema_is_up_to_date():
    shipped = plan_mod.SCHEMA_FILE.read_text()
    assert shipped == plan_mod.schema_text(), "planner/schema/plan.schema.json is stale: run python -m planner.ir.plan --write-schema"


def _validate(value, schema: dict, root: dict, path: str = "plan") -> list[str]:
    """A JSON-Schema subset (type, properties, required, additionalProperties, items, enum, const, anyOf, $ref)."""
    if "$ref" in schema:
        return _validate(value, root["$defs"][schema["$ref"].split("/")[-1]], root, path)
    if "anyOf" in schema:  # only `X or null` is generated: report X's errors for a non-null value
        (inner,) = [s for s in schema["anyOf"] if s != {"type": "null"}]
        return [] if value is None else _validate(value, inner, root, path)
    if "enum" in schema and value not in schema["enum"]:
        return [f"{path}: {value!r} not in enum"]
    if "const" in schema and value != schema["const"]:
        return [f"{path}: != const"]
    kinds = {"integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
             "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
             "string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool),
             "null": lambda v: v is None, "array": lambda v: isinstance(v, list), "object": lambda v: isinstance(v, dict)}
    if "type" in schema and not kinds[schema["type"]](value):
        return [f"{path}: not {schema['type']}"]
    errors = []
    if isinstance(value, dict):
        props = schema.get("properties", {})
        errors += [f"{path}.{k}: required" for k in schema.get("required", []) if k not in value]
        for k, v in value.items():
            if k in props:
                errors += _validate(v, props[k], root, f"{path}.{k}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{path}.{k}: additional property")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += _validate(v, schema["additionalProperties"], root, f"{path}.{k}")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            errors += _validate(v, schema["items"], root, f"{path}[{i}]")
    return errors


def test_example_plans_validate_against_the_shipped_schema(tiny, dsv3):
    schema = json.loads(plan_mod.SCHEMA_FILE.read_text())
    examples = [tiny, dsv3, deepseek_v3_plan("disaggregated"), tiny_plan(weighted=True, shared_pd=True)]
    for p in examples:
        assert _validate(_doc(p), schema, schema) == []
    broken = _doc(tiny)
    broken["decode"]["instances"][0]["ep"] = "six"
    broken["new_field"] = 1
    assert _validate(broken, schema, schema) == ["plan.decode.instances[0].ep: not integer", "plan.new_field: additional property"]


# --- derived views --------------------------------------------------------------------------------


def test_devices_of_covers_every_device(dsv3):
    view = devices_of(dsv3)
    assert [a.device for a in view] == list(range(384))
    roles = {a.role for a in view}
    assert roles == {"both", "idle"}
    assert sum(a.role == "idle" for a in view) == 384 - 96 - 160
    d0 = view[96]  # first decode device: expert slots 0..1 of the 320
    assert (d0.phase, d0.instance, d0.rank, d0.slots) == ("decode", "decode-0", 0, (0, 1))
    placement = dsv3.decode.experts[0]
    assert d0.experts[5] == placement.layers[5].phy2log[0:2]
    assert d0.layers == tuple(range(61)) and d0.server == 12 and d0.pod == 0
    assert len(d0.loads) == 58 and abs(sum(a.mean_load for a in view if a.phase == "decode") / 160 - 1) < 1e-3


def test_devices_of_disaggregated_and_shared_pd():
    p = tiny_plan("tiny-deepseek-v3", decode_mode="disaggregated", attention_devices=2)
    view = {(a.device, a.phase): a for a in devices_of(p)}
    assert view[(2, "decode")].role == "attention" and view[(2, "decode")].slots == ()
    assert view[(4, "decode")].role == "experts" and view[(4, "decode")].layers == (1, 2)
    assert view[(4, "decode")].shared_experts
    shared = tiny_plan(shared_pd=True, decode_devices=4)
    both = [a for a in devices_of(shared) if a.device == 0]
    assert [a.phase for a in both] == ["prefill", "decode"]
    assert devices_of(shared)[-1].role == "idle"


def test_disaggregated_instance_rules():
    p = tiny_plan(decode_mode="disaggregated", attention_devices=3)
    inst = p.decode.instances[0]
    assert inst.af_ratio == 1.0 and inst.role_of(2) == "attention" and inst.role_of(7) == "experts"
    doc = _doc(p)
    doc["decode"]["instances"][0]["expert_devices"].insert(0, 2)
    doc["decode"]["experts"][0]["devices"] = 4
    assert "plan.decode.instances[0].mode: disaggregated: device 2 is both" in _error(doc)


def test_device_ranges():
    assert device_ranges([5, 0, 1, 2, 7, 8, 8]) == "0-2,5,7-8"
    assert device_ranges([]) == ""


def test_from_dict_does_not_mutate_its_input(tiny):
    doc = _doc(tiny)
    snapshot = copy.deepcopy(doc)
    from_dict(doc)
    assert doc == snapshot


def test_factory_variants_are_valid():
    for kwargs in ({"model": "tiny-qwen3-moe", "weighted": True}, {"model": "tiny-olmoe", "prefill_devices": 0},
                   {"model": "tiny-mixtral", "decode_devices": 0, "prefill_instances": 2}):
        p = synthetic_plan(topology="local:8", **kwargs)
        assert from_json(p.to_json()) == p
    with pytest.raises(Exception, match="do not fit local:8"):
        synthetic_plan("tiny-mixtral", "local:8", prefill_devices=4, prefill_instances=3)


def test_ep_has_one_definition():
    from planner.ir.plan import expert_parallel_dies

    # routed-slot devices and dedicated shared-expert devices both join the all-to-all; overlap counts once
    assert expert_parallel_dies((4, 5, 6), (7,), 2) == 8
    assert expert_parallel_dies((0, 1), (0, 1), 2) == 4
    for plan in (tiny_plan("tiny-deepseek-v3"), tiny_plan("tiny-deepseek-v3", decode_mode="disaggregated")):
        for _, inst in plan.instances():
            assert inst.ep == expert_parallel_dies(inst.expert_devices, inst.shared_expert_devices,
                                                   plan.topology.dies_per_device)


def test_unparseable_text_says_whether_it_was_a_plan(tmp_path):
    never = tmp_path / "notes.txt"
    never.write_text("hello")
    with pytest.raises(PlanError, match="not a podplan plan: give the path of a plan .json written by"):
        load_plan(never)
    damaged = tmp_path / "cut.json"
    damaged.write_text((ROOT / "plans" / "tiny-deepseek-v3.local-8.json").read_text()[:300])
    with pytest.raises(PlanError, match="a damaged plan: regenerate it with `podplan compile`"):
        load_plan(damaged)


# --- version 3: the search record ---------------------------------------------------------------


def _search_record() -> SearchRecord:
    return SearchRecord(
        modes=(ModeChoice(mode="disagg", chosen=True, requests_per_s=12.5, output_tokens_per_s_per_device=800.0,
                          tpot_ms=41.0, ttft_ms=900.0, devices=8, config="2 x prefill 1 dev; 1 x colocated 6 dev"),
               ModeChoice(mode="agg", refused="no aggregated configuration meets --tpot-ms 5")),
        why="agg has no plan under these targets and devices (see its row)", devices=8,
        imbalance={"prefill": 1.0, "decode": 1.04}, notes=("tiny is small",))


def test_version_2_plans_still_load_and_keep_their_bytes(tiny):
    doc = _doc(tiny)
    assert "search" not in doc  # optional: written only when set
    doc["schema_version"] = 2
    text = json.dumps(doc, sort_keys=True)
    back = from_json(text)
    assert back.schema_version == 2 and back.search is None
    assert json.loads(back.to_json()) == doc  # re-written as version 2, nothing added


def test_search_record_round_trips_and_needs_version_3(tiny):
    plan = replace(tiny, search=_search_record())
    text = plan.to_json()
    assert from_json(text) == plan and from_json(text).to_json() == text
    doc = json.loads(text)
    doc["schema_version"] = 2
    assert _error(doc) == ("plan.search: a version 2 plan has no search field (added in version 3); drop it or set "
                           "schema_version 3")


@pytest.mark.parametrize("mutate,expected", [
    (lambda s: s["modes"].reverse(), "plan.search.modes: the chosen mode comes first, and only it is chosen"),
    (lambda s: s["modes"][1].update(mode="disagg"), "plan.search.modes[1].mode: mode 'disagg' listed twice"),
    (lambda s: s["modes"][1].update(refused=""), "plan.search.modes[1].refused: give either the figures of the "
                                                 "mode's best plan or the reason it has none"),
    (lambda s: s["imbalance"].update(decode=0.9), "plan.search.imbalance.decode: 0.9 < 1: max/mean load is at least 1"),
    (lambda s: s["modes"][0].update(mode="hybrid"), "plan.search.modes[0].mode: the string 'hybrid' is not one of agg, "
                                                    "disagg"),
])
def test_search_record_rules_name_the_path(tiny, mutate, expected):
    doc = _doc(replace(tiny, search=_search_record()))
    mutate(doc["search"])
    assert _error(doc) == expected
