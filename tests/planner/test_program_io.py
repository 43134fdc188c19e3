"""program.json: the staged program compiled once (on meta) and bound to a worker's own model.

The round trip must run exactly what the pipeline made; a document naming anything but tensor
math and the model's own modules is refused in one line before any of it runs.
"""

from __future__ import annotations

import copy
import functools
import json
import random

import pytest
import torch

from passes.graphs import new_kv_cache
from planner.frontend import zoo
from planner.frontend.errors import ConfigError
from planner.frontend.program_io import (program_document, program_from_json, program_to_json, read_program,
                                         write_program)
from planner.frontend.stages import run_staged, staged_program
from planner.frontend.trace import build_model, trace_model
from planner.frontend.zoo import load_source
from tests.passes.conftest import TINY
from tests.passes.test_numerics import _check_lossless, _random_partition
from tests.planner.test_families import TRACED, small_config


@functools.lru_cache(maxsize=None)
def _doc(name: str) -> str:
    return json.dumps(program_document(name), sort_keys=True)


def _bound(name: str, seed: int = 3):
    src = load_source(name)
    model = build_model(src, device="cpu", seed=seed)
    return src, model


@pytest.mark.parametrize("name", TINY)
def test_the_shipped_program_computes_what_the_pipeline_made(name):
    src, model = _bound(name)
    doc = json.loads(_doc(name))  # through text, as a worker reads it
    shipped = program_from_json(doc, model, src)
    original = staged_program(trace_model(model, src))
    ids = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    nxt = ids[:, -1:]
    num = max(w.num_experts for w in original.experts.values())
    groups = [list(range(0, num, 2)), list(range(1, num, 2))]
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
    for program in (shipped, original):
        cache = new_kv_cache()
        got = run_staged(program, ids, cache=cache, expert_groups=groups)
        step = run_staged(program, nxt, past_len=5, cache=cache, expert_groups=groups)
        assert float((got - want).abs().max()) <= 1e-4
        if program is shipped:
            first, second = got, step
    cache = new_kv_cache()
    ref_first = run_staged(original, ids, cache=cache)
    ref_second = run_staged(original, nxt, past_len=5, cache=cache)
    assert torch.equal(first, ref_first) and torch.equal(second, ref_second)
    assert sorted(shipped.experts) == sorted(original.experts)
    # the stage modules hold the model's own weights (bound by path, not copied)
    stage = shipped.gm.get_submodule(next(iter(shipped.experts)))
    assert any(p is q for p in stage.parameters() for q in model.parameters())


@pytest.mark.parametrize("family", TRACED)
def test_a_program_compiled_on_meta_is_lossless_on_real_weights(family):
    """What the launcher ships (traced without weights) runs every traced family exactly."""
    src = zoo.ModelSource(f"small-{family}", "test", small_config(family))
    traced = trace_model(build_model(src, device="meta"), src)
    doc = json.loads(json.dumps(program_to_json(staged_program(traced), traced.gm)))
    model = build_model(src, device="cpu", seed=1)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # zero-initialised biases get values, so the split has to carry them right
        for p in [*model.parameters(), *model.buffers()]:
            if p.is_floating_point() and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    program = program_from_json(doc, model, src)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    _check_lossless(model, program, ids, prompt=6, groups=_random_partition(8, 2, random.Random(family)))


def test_the_document_is_deterministic_json(tmp_path):
    doc = json.loads(_doc("tiny-deepseek-v3"))
    path = write_program(doc, tmp_path / "program.json")
    again = write_program(program_document("tiny-deepseek-v3"), tmp_path / "again.json")
    assert path.read_bytes() == again.read_bytes()
    assert read_program(path) == doc


def _hostile(edit) -> str:
    doc = json.loads(_doc("tiny-olmoe"))
    edit(doc)
    src, model = _bound("tiny-olmoe")
    with pytest.raises(ConfigError) as exc:
        program_from_json(copy.deepcopy(doc), model, src)
    message = str(exc.value)
    assert "\n" not in message
    return message


def _first(doc, op: str, stage: str | None = None) -> dict:
    nodes = [n for sdoc in doc["stages"].values() for n in sdoc["nodes"]] if stage is None else doc["stages"][stage]["nodes"]
    return next(n for n in nodes if n["op"] == op)


@pytest.mark.parametrize("target", ["os:system", "builtins:eval", "builtins:exec", "torch:load", "torch:save",
                                    "builtins:__import__", "subprocess:run", "torch:from_file", "operator",
                                    "operator:call", "operator:methodcaller", "torch:compile", "torch.hub:load"])
def test_an_unknown_call_target_is_refused_naming_it(target):
    message = _hostile(lambda doc: _first(doc, "call_function").update(target=target))
    assert repr(target) in message and "allow-list" in message


def test_a_module_path_outside_the_model_is_refused():
    def edit(doc):
        sdoc = doc["stages"]["layer0_attention"]
        attr = next(iter(sdoc["refs"]))
        sdoc["refs"][attr] = "lm.__class__.__init__.__globals__"
    message = _hostile(edit)
    assert "lm.__class__.__init__.__globals__" in message and "not a module, parameter or buffer" in message


@pytest.mark.parametrize("method", ["__reduce_ex__", "_fix_weakref", "no_such_method"])
def test_a_private_or_unknown_method_is_refused(method):
    def edit(doc):
        node = next(n for s in doc["stages"].values() for n in s["nodes"] if n["op"] == "call_method")
        node["target"] = method
    assert repr(method) in _hostile(edit)


def test_code_smuggled_into_names_or_values_is_refused():
    assert "not a plain identifier" in _hostile(
        lambda doc: _first(doc, "placeholder", "head").update(name="x=__import__('os').system('true')#"))
    assert "not a podplan program value" in _hostile(
        lambda doc: _first(doc, "call_function").update(args={"pickle": "gASV..."}))

    def dunder(doc):
        node = _first(doc, "call_function")
        node.update(target="builtins:getattr", args={"tuple": [node["args"]["tuple"][0], "__class__"]})
    assert "only public attributes" in _hostile(dunder)


def test_another_models_program_is_refused():
    def edit(doc):
        doc["model"] = "tiny-mixtral"
    assert "tiny-mixtral" in _hostile(edit)


def test_a_missing_or_broken_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="missing"):
        read_program(tmp_path / "program.json")
    (tmp_path / "program.json").write_text("\x80not json")
    with pytest.raises(ConfigError, match="not JSON"):
        read_program(tmp_path / "program.json")
