"""Expect tests: the staged program of every tiny family, as text, against a checked-in snapshot.

A pass that changes what the pipeline produces shows up here as a readable diff (the top-level
graph that wires the stages, and the stage/cut tables); the numerics of the same programs are
checked against eager transformers in test_numerics.py. After an intended change, regenerate:

    PODPLAN_UPDATE_SNAPSHOTS=1 .venv/bin/python -m pytest tests/passes/test_snapshots.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from planner.frontend.stages import stage_document
from tests.passes.conftest import TINY, staged

SNAPSHOTS = Path(__file__).parent / "snapshots"


def _render(name: str) -> str:
    program = staged(name)
    doc = stage_document(program)
    wiring = program.gm.code.strip()
    return f"# {name}: top-level graph after the stage-split pipeline\n{wiring}\n\n" + json.dumps(
        {k: doc[k] for k in ("stage_counts", "stages", "phases", "microbatch_schedule")}, indent=1, sort_keys=True
    ) + "\n"


@pytest.mark.parametrize("name", TINY)
def test_staged_program_matches_snapshot(name):
    text = _render(name)
    path = SNAPSHOTS / f"{name}.txt"
    if os.environ.get("PODPLAN_UPDATE_SNAPSHOTS"):
        path.write_text(text)
    assert path.is_file(), f"{path} missing: regenerate with PODPLAN_UPDATE_SNAPSHOTS=1"
    assert text == path.read_text(), f"{name}: staged program changed; review the diff, then regenerate"
