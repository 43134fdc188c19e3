"""The pass registry: every pass file is registered under its own NAME; passes stay independent."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import passes
from costmodels.errors import InputError
from passes import PASSES, PIPELINES, get_pass, get_pipeline

# Modules of passes/ that are infrastructure, not passes.
INFRA = {"manager", "meta", "context", "graphs", "errors"}
PASS_DIR = Path(passes.__file__).parent


def _pass_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules([str(PASS_DIR)]) if m.name not in INFRA)


def test_every_pass_file_is_registered_under_its_name():
    names = _pass_modules()
    assert len(names) == len(PASSES) >= 8
    for mod_name in names:
        module = importlib.import_module(f"passes.{mod_name}")
        assert hasattr(module, "NAME"), f"passes/{mod_name}.py has no NAME: register it or list it in INFRA"
        assert module.NAME == mod_name.replace("_", "-"), (module.NAME, mod_name)
        info = PASSES[module.NAME]
        entry = getattr(module, mod_name)
        assert info.run is entry, f"{module.NAME} registered with the wrong entry function"
        assert info.needs == tuple(module.NEEDS) and info.provides == tuple(module.PROVIDES)
        doc = (entry.__doc__ or "").strip()
        assert doc and "\n" not in doc, f"{module.NAME}: the entry function needs a one-line docstring"


def test_no_pass_imports_another_pass():
    names = set(_pass_modules())
    for mod_name in names:
        tree = ast.parse((PASS_DIR / f"{mod_name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "passes":
                imported = {a.name for a in node.names} & names
                assert not imported, f"passes/{mod_name}.py imports pass {imported}"
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("passes."):
                assert node.module.split(".")[1] not in names, f"passes/{mod_name}.py imports {node.module}"


def test_unknown_pass_and_pipeline_names():
    with pytest.raises(InputError, match=r"unknown pass 'splitt'; known: kv-cache, annotate, classify, split"):
        get_pass("splitt")
    with pytest.raises(InputError, match=r"unknown pipeline 'x'; known: annotate, stage-split"):
        get_pipeline("x")


def test_pipelines_name_registered_passes_in_dependency_order():
    provided = {"podplan.role", "podplan.layer", "podplan.module"}  # the frontend's
    for pipeline in PIPELINES.values():
        have = set(provided)
        for name in pipeline:
            info = get_pass(name)
            if pipeline != PIPELINES["annotate"]:
                assert set(info.needs) <= have, (name, set(info.needs) - have)
            have |= set(info.provides)
