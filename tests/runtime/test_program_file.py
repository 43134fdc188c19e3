"""program.json in a job directory: what the ranks run, read as data; a tampered one stops every rank in one line."""

from __future__ import annotations

import json

import pytest

from planner.frontend.program_io import PROGRAM_FILE, program_document
from tests.conftest import run_cli
from tests.runtime.test_torchrun import RUN, _torchrun

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("plans") / "tiny.json"
    proc = run_cli("compile", "tiny-olmoe", "--topology", "local:2", "-o", str(path))
    assert proc.returncode == 0, proc.stderr
    return path


def test_a_job_ships_the_program_and_a_tampered_one_is_refused_by_the_ranks(plan_file, tmp_path):
    job_dir = tmp_path / "job"
    proc = run_cli("run", str(plan_file), *RUN, "--job-dir", str(job_dir))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((job_dir / PROGRAM_FILE).read_text())
    assert doc == json.loads(json.dumps(program_document("tiny-olmoe")))  # compiled on meta, deterministic
    node = next(n for s in doc["stages"].values() for n in s["nodes"] if n["op"] == "call_function")
    node["target"] = "os:system"
    (job_dir / PROGRAM_FILE).write_text(json.dumps(doc))
    ran = _torchrun(proc.stdout.strip())
    assert ran.returncode != 0
    report = run_cli("run", str(job_dir))
    assert report.returncode == 1 and "Traceback" not in report.stderr
    assert "'os:system' is not on podplan's allow-list" in report.stderr, report.stderr
    assert len(report.stderr.strip().splitlines()) == 1, report.stderr
