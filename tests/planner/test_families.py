"""Every MoE family the installed transformers ships is traced exactly or refused in one line.

The family list is read from transformers (planner.frontend.families), not kept here. Each family is
tried on a tiny config made from its own config class; one marked traced must stay lossless against
transformers (prefill, cached prefill, one decode step, experts split over two groups, every
all-zero tensor randomised so biases count); one refused must say why in one line through the CLI,
exit 2, no traceback. Broken configs of every family (a MoE-shape key missing, a string or a list
where a number belongs) are one line too.
"""

from __future__ import annotations

import functools
import json
import random

import pytest
import torch

from planner.cli.main import main
from planner.frontend import families, zoo
from planner.frontend.config_keys import moe_shape_keys
from planner.frontend.shape import shape_from_traced
from planner.frontend.stages import compile_stages
from planner.frontend.trace import build_model, trace_model, validate_config
from tests.conftest import error_lines
from tests.passes.test_numerics import _check_lossless, _random_partition

FAMILIES = [f.name for f in families.moe_families()]
# A floor, not the list: families traced before this test iterated over all of them, which must stay traced.
KNOWN_TRACED = {"cohere2_moe", "deepseek_v2", "deepseek_v3", "dots1", "exaone_moe", "glm4_moe", "glm4_moe_lite",
                "gpt_oss", "granitemoe", "granitemoe_swa", "granitemoeshared", "hunyuan_v1_moe", "minimax_m3_vl",
                "mixtral", "olmoe", "phimoe", "qwen2_moe", "qwen3_moe"}


@functools.lru_cache(maxsize=None)
def status(name: str) -> families.FamilyStatus:
    return families.try_family(families.family(name))


def small_config(name: str) -> dict:
    """The family's tiny config.json (its own config class's defaults, shrunk)."""
    return families.tiny_config(families.family(name))


# the families marked traced, tried once per test process (test_program_io ships each one's program too)
TRACED = [n for n in FAMILIES if status(n).traced]


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _one_line(rc: int, err: str, *fragments: str) -> str:
    assert rc == 2, err
    # a family slower to trace than the progress grace period gets its `HH:MM:SS podplan trace: tracing ...`
    # line first (stderr is not a terminal here): the refusal must still be the one line after it
    lines = error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])
    return lines[0]


def test_families_are_read_from_transformers():
    assert len(FAMILIES) >= 40 and len(set(FAMILIES)) == len(FAMILIES)
    assert KNOWN_TRACED <= set(FAMILIES)
    # hybrids, encoder-decoders and multimodal families are listed too (and refused below, with a reason)
    assert {"jamba", "qwen3_next", "switch_transformers", "qwen3_vl_moe", "llama4"} <= set(FAMILIES)
    assert KNOWN_TRACED <= {n for n in FAMILIES if status(n).traced}


@pytest.mark.parametrize("name", FAMILIES)
def test_family_is_traced_exactly_or_refused_in_one_line(name, tmp_path, capsys):
    fam = families.family(name)
    cfg = families.tiny_config(fam)
    st = status(name)
    if not st.traced:
        path = tmp_path / "config.json"
        path.write_text(json.dumps(cfg))
        rc, _, err = _cli(capsys, "trace", str(path), "--stages")
        line = _one_line(rc, err)
        assert st.reason.removeprefix(f"{name}: ") in line and families.reason_group(st.reason) != "other", line
        return
    src = zoo.ModelSource(f"tiny-{name}", "test", cfg)
    model = build_model(src, device="cpu", seed=1)
    # transformers zero-initialises biases (per-expert ones, score-correction biases): give every all-zero
    # tensor random values so that the split has to carry them right
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in [*model.parameters(), *model.buffers()]:
            if p.is_floating_point() and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    traced = trace_model(model, src)
    shape = shape_from_traced(traced)
    assert shape.num_routed_experts == families.TINY_EXPERTS and shape.num_moe_layers >= 1
    program = compile_stages(traced, shape, batch=2, seq=6)
    ids = torch.randint(0, families.TINY_VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    groups = _random_partition(families.TINY_EXPERTS, 2, random.Random(name))
    assert all(groups)
    _check_lossless(model, program, ids, prompt=6, groups=groups)


def _decoder(cfg: dict) -> dict:
    return cfg["text_config"] if "text_config" in cfg and "hidden_size" not in cfg else cfg


@pytest.mark.parametrize("name", FAMILIES)
def test_broken_configs_of_every_family_are_one_line(name, tmp_path, capsys):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    fam = families.family(name)
    good = families.tiny_config(fam)
    cls = CONFIG_MAPPING[fam.decoder_type]
    path = tmp_path / "config.json"
    broken = []
    for spellings in moe_shape_keys(cls):  # each MoE-shape key missing in turn
        cfg = json.loads(json.dumps(good))
        dec = _decoder(cfg)
        if any(k in dec for k in spellings):
            for k in spellings:
                dec.pop(k, None)
            broken.append((cfg, spellings[0]))
    for key, bad in (("hidden_size", "64"), ("num_hidden_layers", [2]), ("num_attention_heads", 4.5)):
        cfg = json.loads(json.dumps(good))
        _decoder(cfg)[key] = bad
        broken.append((cfg, key))
    assert len(broken) >= 3
    for cfg, key in broken:
        path.write_text(json.dumps(cfg))
        rc, _, err = _cli(capsys, "trace", str(path))
        line = _one_line(rc, err)
        # the line names the key, unless the family is refused before its keys are read
        assert key in line or "no causal-LM class" in line, line


@pytest.mark.parametrize("content,fragment", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not UTF-8 text"),
    ('{"model_type": "mixtral", "name": "caf\xe9"}'.encode("latin-1"), "not UTF-8 text"),
    (b'{"model_type": "mixtral",\x00 "hidden_size": 4}', "NUL bytes"),
])
def test_unreadable_config_files_are_one_line(content, fragment, tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_bytes(content)
    _one_line(*_cli(capsys, "trace", str(path))[::2], fragment)


def test_missing_moe_key_is_named_not_filled_from_defaults(tmp_path, capsys):
    cfg = dict(zoo.load_source("tiny-qwen3-moe").config)
    del cfg["moe_intermediate_size"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    _one_line(*_cli(capsys, "trace", str(path))[::2], "no 'moe_intermediate_size'", "qwen3_moe")
    cfg = dict(zoo.load_source("tiny-qwen3-moe").config, num_experts_per_tok=None)
    del cfg["num_experts_per_tok"]
    path.write_text(json.dumps(cfg))
    _one_line(*_cli(capsys, "trace", str(path))[::2], "'num_experts_per_tok'")
    path.write_text(json.dumps(dict(zoo.load_source("tiny-qwen3-moe").config, num_experts="8")))
    _one_line(*_cli(capsys, "trace", str(path))[::2], "'num_experts' must be a whole number", "a string", "write 8")


def test_bundled_configs_still_validate():
    for name in zoo.bundled_names():
        validate_config(zoo.load_source(name))


def test_models_families_lists_every_family_with_its_status(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PODPLAN_CACHE", str(tmp_path))
    rc, out, err = _cli(capsys, "models", "--families", "--json")
    assert rc == 0, err
    rows = json.loads(out)
    assert [r["family"] for r in rows] == FAMILIES
    for r in rows:
        assert (r["status"] == "traced") == status(r["family"]).traced
        assert r["status"] == "traced" or (r["reason"] and "\n" not in r["reason"] and r["group"] != "other")
    assert list(tmp_path.glob("families-*.json"))  # the statuses are cached ...
    rc, out2, _ = _cli(capsys, "models", "--families", "--json")
    assert rc == 0 and out2 == out  # ... and read back the same
    rc, table, _ = _cli(capsys, "models", "--families")
    assert rc == 0 and f"MoE families of transformers: {len(rows)}" in table
