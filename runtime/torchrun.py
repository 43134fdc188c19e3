"""Hand a run to torchrun: write the job directory, read back what its ranks wrote.

`podplan run PLAN --job-dir DIR` validates the plan and writes DIR/job.json and DIR/program.json
(the staged program, compiled once on the meta device); any launcher that sets
RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT (torchrun on one host or many, a Slurm script) then
starts `python -m runtime.worker DIR/job.json` per rank. Rank 0 writes DIR/result.pt, a failing rank
DIR/rank<R>.error.json; `podplan run DIR` turns either into the same report `podplan run PLAN` prints.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import torch

from planner.frontend.program_io import PROGRAM_FILE, program_document, write_program
from runtime.errors import RankFailure, SpecError
from runtime.launch import RunOutcome
from runtime.spec import RunSpec

JOB = "job.json"
RESULT = "result.pt"


def write_job(spec: RunSpec, job_dir: str | Path) -> Path:
    """DIR/job.json for `spec`; stale results and error reports of an earlier run are removed."""
    out = Path(job_dir)
    if out.exists() and not out.is_dir():
        raise SpecError(f"--job-dir {out} is a file; give a directory (it is created if missing)")
    out.mkdir(parents=True, exist_ok=True)
    for stale in [out / RESULT, *out.glob("rank*.error.json")]:
        stale.unlink(missing_ok=True)
    write_program(program_document(spec.model), out / PROGRAM_FILE)  # the ranks bind it, never trace
    tmp = out / f".{JOB}.tmp"
    tmp.write_text(spec.to_json())
    os.replace(tmp, out / JOB)
    return out / JOB


def command(spec: RunSpec, job: Path) -> str:
    """The torchrun line for one host; across hosts add --nnodes and a rendezvous endpoint."""
    return f"torchrun --standalone --nproc-per-node {spec.world_size} -m runtime.worker {shlex.quote(str(job))}"


def is_job_dir(path: str | Path) -> bool:
    return Path(path).is_dir()


def read_spec(job_dir: str | Path) -> RunSpec:
    job = Path(job_dir) / JOB
    if not job.is_file():
        raise SpecError(f"{job_dir} holds no {JOB}; write one with `podplan run PLAN.json --job-dir {job_dir}`")
    try:
        return RunSpec.from_json(job.read_text())
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SpecError(f"{job} is not a podplan job ({type(exc).__name__}: {exc}); write it again with "
                        "`podplan run PLAN.json --job-dir`") from None


def collect(job_dir: str | Path) -> RunOutcome:
    """The outcome rank 0 wrote; RankFailure if a rank reported an error, SpecError if nothing ran yet."""
    out = Path(job_dir)
    spec = read_spec(out)
    errors = []
    for path in sorted(out.glob("rank*.error.json")):
        errors.append(_error_record(path))
    if errors:
        _, _, rank, message = min(errors)  # a rank's own failure before peers that lost their connection
        raise RankFailure(rank, message)
    result = out / RESULT
    if not result.is_file():
        raise SpecError(f"{out} holds no {RESULT} yet; run `{command(spec, out / JOB)}` first")
    rerun = f"run `{command(spec, out / JOB)}` again"
    try:
        data = torch.load(result, weights_only=True)  # tensors and plain metrics: no pickled code
    except Exception as exc:  # noqa: BLE001 - torch raises anything from a truncated or foreign file
        raise SpecError(f"{result}: not a result podplan wrote ({_first_line(exc)}); {rerun}") from None
    try:
        metrics = list(data["metrics"])
        wall = max(float(m.get("setup_s", 0.0)) + float(m.get("run_s", 0.0)) for m in metrics) if metrics else 0.0
        tokens, logits = data["tokens"], data["logits"]
        if not isinstance(tokens, torch.Tensor) or not isinstance(logits, torch.Tensor):
            raise TypeError("tokens and logits must be tensors")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SpecError(f"{result}: not a result podplan wrote ({type(exc).__name__}: {_first_line(exc)}); "
                        f"{rerun}") from None
    return RunOutcome(tokens, logits, metrics, wall)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def _error_record(path: Path) -> tuple[bool, float, int, str]:
    """(secondary, time, rank, message) of a rank's error report; SpecError when it is not one."""
    try:
        rec = json.loads(path.read_text())
        secondary, when, rank, message = rec["secondary"], float(rec["time"]), rec["rank"], rec["message"]
        if not isinstance(secondary, bool) or not isinstance(rank, int) or not isinstance(message, str):
            raise TypeError("secondary, rank and message must be a boolean, an integer and a string")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise SpecError(f"{path}: not an error report a rank wrote ({type(exc).__name__}: {_first_line(exc)}); "
                        "remove it or rerun the job") from None
    return secondary, when, rank, message.strip().splitlines()[0] if message.strip() else "(no message)"
