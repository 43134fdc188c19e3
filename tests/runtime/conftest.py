"""Helpers for the runtime tests: model facts, spec builders, and a check that no worker outlives a run."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from passes import get_pipeline
from planner.frontend.program_io import program_document
from planner.frontend.stages import PIPELINE
from runtime.launch import ModelFacts, model_facts
from runtime.spec import InstanceSpec, RunSpec, make_instance

FAMILIES = ("tiny-qwen3-moe", "tiny-mixtral", "tiny-olmoe", "tiny-deepseek-v3")


@functools.lru_cache(maxsize=None)
def facts(model: str) -> ModelFacts:
    return model_facts(RunSpec(model, 1, ()))


def program(model: str) -> dict:
    """The staged program document the launcher ships to the workers (for the current pipeline)."""
    return _program(model, get_pipeline(PIPELINE))


@functools.lru_cache(maxsize=None)
def _program(model: str, pipeline: tuple[str, ...]) -> dict:
    return program_document(model)


def instance(model: str, name: str, phases: tuple[str, ...], attention: list[int], experts: list[int],
             **kwargs) -> InstanceSpec:
    f = facts(model)
    return make_instance(name, phases, attention, experts, num_experts=f.num_experts, moe_layers=f.moe_layers,
                         **kwargs)


def colocated(model: str, ranks: int = 4, *, microbatches: int = 1, slots_per_rank: int | None = None,
              shares: str = "equal", **run) -> RunSpec:
    """Every rank runs attention and hosts experts."""
    rs = list(range(ranks))
    inst = instance(model, "both-0", ("prefill", "decode"), rs, rs, microbatches=microbatches,
                    slots_per_rank=slots_per_rank, shares=shares)
    return RunSpec(model, ranks, (inst,), **run)


def disaggregated(model: str, attention: int = 2, experts: int = 2, *, microbatches: int = 1,
                  slots_per_rank: int | None = None, shares: str = "equal", **run) -> RunSpec:
    """Attention ranks 0..a-1, expert ranks a..a+e-1 (shared experts on the expert ranks)."""
    a, e = list(range(attention)), list(range(attention, attention + experts))
    inst = instance(model, "afd-0", ("prefill", "decode"), a, e, microbatches=microbatches,
                    slots_per_rank=slots_per_rank, shared=e, shares=shares)
    return RunSpec(model, attention + experts, (inst,), **run)


def worker_pids() -> list[int]:
    """Live children of this process's multiprocessing forkserver (the launcher's workers)."""
    from multiprocessing import forkserver

    server = getattr(forkserver._forkserver, "_forkserver_pid", None)
    if server is None:
        return []
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == server and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and " Z " not in Path(f"/proc/{pid}/stat").read_text()
