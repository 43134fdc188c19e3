"""The same worker under torchrun: `podplan run PLAN --job-dir DIR`, torchrun, then `podplan run DIR`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from runtime.worker import FAULT_ENV
from tests.conftest import ROOT, assert_one_line_error, run_cli

pytestmark = pytest.mark.slow

RUN = ("--prompts", "4", "--prompt-len", "5", "--new-tokens", "3")


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory):
    """A compiled local:4 plan: rank 0 decode attention, ranks 1-2 decode experts, rank 3 prefill."""
    path = tmp_path_factory.mktemp("plans") / "tiny.json"
    proc = run_cli("compile", "tiny-qwen3-moe", "--topology", "local:4", "--decode-mode", "afd",
                   "--attention-devices", "1", "--moe-devices", "2", "--prefill-devices", "1", "-o", str(path))
    assert proc.returncode == 0, proc.stderr
    return path


def _torchrun(line: str, nproc: int | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the printed torchrun line as `python -m torch.distributed.run` (the venv's torchrun)."""
    args = line.split()
    assert args[0] == "torchrun", line
    if nproc is not None:
        args[args.index("--nproc-per-node") + 1] = str(nproc)
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", *args[1:]], capture_output=True,
                          text=True, cwd=ROOT, env=full_env, timeout=300)


def _job(plan_file, job_dir) -> str:
    proc = run_cli("run", str(plan_file), *RUN, "--job-dir", str(job_dir))
    assert proc.returncode == 0, proc.stderr
    assert (job_dir / "job.json").is_file() and not (job_dir / "result.pt").exists()
    return proc.stdout.strip()


def test_a_job_run_by_torchrun_reports_and_checks_like_podplan_run(plan_file, tmp_path):
    job_dir = tmp_path / "job"
    line = _job(plan_file, job_dir)
    n = json.loads((job_dir / "job.json").read_text())["world_size"]
    assert f"--nproc-per-node {n} -m runtime.worker {job_dir / 'job.json'}" in line
    ran = _torchrun(line)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert (job_dir / "result.pt").is_file()
    proc = run_cli("run", str(job_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["world_size"] == n and len(doc["ranks"]) == n
    assert doc["check"]["ok"] and doc["check"]["tokens_match"] and doc["check"]["max_abs_diff"] <= 1e-4
    assert (doc["prompts"], doc["prompt_len"], doc["new_tokens"]) == (4, 5, 3)
    # writing the job again clears the old result: a report never shows a previous run
    _job(plan_file, job_dir)
    assert_one_line_error(run_cli("run", str(job_dir)), "no result.pt", "torchrun")


def test_a_failing_rank_under_torchrun_is_named_by_the_report(plan_file, tmp_path):
    job_dir = tmp_path / "job"
    ran = _torchrun(_job(plan_file, job_dir), env={FAULT_ENV: "1:1:raise"})
    assert ran.returncode != 0
    proc = run_cli("run", str(job_dir))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "rank 1" in proc.stderr and "injected fault" in proc.stderr, proc.stderr


def test_torchrun_with_the_wrong_process_count_fails_in_one_line(plan_file, tmp_path):
    job_dir = tmp_path / "job"
    line = _job(plan_file, job_dir)
    n = json.loads((job_dir / "job.json").read_text())["world_size"]
    ran = _torchrun(line, nproc=2)
    assert ran.returncode != 0
    proc = run_cli("run", str(job_dir))
    assert proc.returncode == 1
    assert f"the job needs {n}: use torchrun --nproc-per-node {n}" in proc.stderr, proc.stderr


def test_bad_job_dirs_get_one_line(plan_file, tmp_path):
    assert_one_line_error(run_cli("run", str(tmp_path)), "holds no job.json", "--job-dir")
    (tmp_path / "job.json").write_text("{not json")
    assert_one_line_error(run_cli("run", str(tmp_path)), "is not a podplan job")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert_one_line_error(run_cli("run", str(plan_file), "--job-dir", str(a_file)), "is a file")
    assert_one_line_error(run_cli("run", str(tmp_path), "--job-dir", str(tmp_path / "x")), "already a job directory")


def test_a_gpu_job_is_written_on_a_host_without_gpus(plan_file, tmp_path):
    """The ranks of a --job-dir run elsewhere: this host's lack of CUDA is not checked, the plan still is."""
    proc = run_cli("run", str(plan_file), "--backend", "nccl", "--job-dir", str(tmp_path / "job"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "job" / "job.json").read_text())["backend"] == "nccl"
    # run here, on a host with fewer GPUs than ranks, the same plan is refused before any process starts
    import torch

    if torch.cuda.device_count() < 4:
        assert_one_line_error(run_cli("run", str(plan_file), "--backend", "nccl"), "needs 4 CUDA GPUs")


def test_the_reference_of_a_gpu_run_is_built_where_its_weights_were_drawn(tmp_path):
    """Seeded weights differ between the CPU's and CUDA's generators: an nccl run is checked on a GPU."""
    import dataclasses

    import torch

    from runtime.errors import SpecError
    from runtime.reference import reference_device
    from tests.runtime.conftest import colocated

    gloo = colocated("tiny-qwen3-moe", 2)
    nccl = dataclasses.replace(gloo, backend="nccl")
    assert reference_device(gloo) == "cpu"
    assert reference_device(dataclasses.replace(nccl, weights=str(tmp_path / "w.safetensors"))) == "cpu"
    if torch.cuda.is_available():
        assert reference_device(nccl) == "cuda:0"
    else:
        with pytest.raises(SpecError, match="drawn on the GPU.*--weights"):
            reference_device(nccl)
