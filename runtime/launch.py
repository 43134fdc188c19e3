"""Start one worker process per rank, watch them, and collect the result or name the rank that failed.

Everything that can be checked is checked before a process starts (`validate`): the host can run
the ranks, the spec matches the model, the weights file fits, and the dry run finds no deadlock.
A rank that raises or dies stops the whole run within seconds; no worker outlives the launcher.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from planner.frontend.program_io import PROGRAM_FILE, program_document, write_program
from runtime.errors import RankFailure, SpecError
from runtime.parts import check_weights
from runtime.schedule import dry_run, programs
from runtime.spec import RunSpec
from runtime.worker import COLLECTIVE_TIMEOUT_S, FAULT_ENV, forked_main

# Resident memory of one CPU worker (torch + transformers + a tiny model), measured ~0.45 GiB; with
# headroom this bounds how many ranks a host can run "sensibly".
RANK_GIB = 0.6
MAX_RANKS = 64  # costmodels.topology.MAX_LOCAL
# After the first rank fails, how long the others get to exit on their own before SIGKILL.
GRACE_S = 3.0


@dataclass(frozen=True)
class ModelFacts:
    """What the spec is checked against: the model's MoE layers, experts, vocab, context."""

    name: str
    moe_layers: list[int]
    num_experts: int
    vocab: int
    max_positions: int
    has_shared: bool


@dataclass
class RunOutcome:
    """What the workers produced: tokens [N, T], last-position logits [N, T, V], per-rank metrics."""

    tokens: torch.Tensor
    logits: torch.Tensor
    metrics: list[dict]
    wall_s: float  # launch to result, including process start-up


def host_capacity() -> int:
    """Ranks this host runs sensibly: memory for RANK_GIB each, at most MAX_RANKS (or $PODPLAN_MAX_RANKS)."""
    override = os.environ.get("PODPLAN_MAX_RANKS")
    if override and override.isdigit():
        return max(1, min(MAX_RANKS, int(override)))
    try:
        avail_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                         if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return MAX_RANKS
    return max(1, min(MAX_RANKS, int(avail_kib / 2**20 / RANK_GIB)))


def model_facts(spec: RunSpec) -> ModelFacts:
    from planner.frontend.trace import trace

    traced = trace(spec.model, device="meta")
    cfg = traced.config
    shared = any(role == "shared_experts" for role, _ in traced.roles.leaves.values())
    facts = ModelFacts(traced.source.name, sorted(traced.roles.experts), traced.roles.num_experts, cfg.vocab_size,
                       int(getattr(cfg, "max_position_embeddings", 1 << 30)), shared)
    if shared and any(_has_remote_shared(inst) for inst in spec.instances):
        from planner.frontend.stages import staged_program
        from runtime.interpreter import check_remote_shared

        check_remote_shared(staged_program(traced), facts.name)
    return facts


def _has_remote_shared(inst) -> bool:
    return bool(inst.shared_ranks) and any(r not in inst.shared_ranks for r in inst.attention_ranks)


def validate(spec: RunSpec, *, on_this_host: bool = True) -> ModelFacts:
    """Every check that can fail before a process starts; SpecError (exit 2) with one line otherwise.

    `on_this_host=False` is for a job handed to torchrun (possibly on other hosts): the checks of this
    host's GPUs and memory are skipped, everything about the spec and the model still runs.
    """
    if spec.backend not in ("gloo", "nccl"):
        raise SpecError(f"backend '{spec.backend}' is not supported; use gloo (CPU) or nccl (GPU)")
    if on_this_host:
        _check_host(spec)
    for name in ("prompts", "prompt_len", "new_tokens"):
        if getattr(spec, name) < 1:
            raise SpecError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(spec, name)}")
    _check_layout(spec)
    facts = model_facts(spec)
    if spec.prompt_len + spec.new_tokens > facts.max_positions:
        raise SpecError(f"prompt length {spec.prompt_len} + {spec.new_tokens} new tokens exceed {facts.name}'s "
                        f"{facts.max_positions} positions; ask for fewer tokens")
    for inst in spec.instances:
        _check_placement(inst, facts)
    check_weights(spec)
    groups = {inst.name: inst.ranks for inst in spec.instances}
    dry_run(programs(spec, facts.moe_layers), groups)
    return facts


def _check_host(spec: RunSpec) -> None:
    n = spec.world_size
    if spec.backend == "nccl" and (not torch.cuda.is_available() or torch.cuda.device_count() < n):
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise SpecError(f"backend nccl needs {n} CUDA devices, this host has {have}; use --backend gloo")
    cap = host_capacity()
    if not 1 <= n <= cap:
        raise SpecError(f"the plan needs {n} processes; this host runs at most {cap} (about {RANK_GIB} GiB of "
                        "memory each); compile for a smaller local:N")


def _check_layout(spec: RunSpec) -> None:
    owner: dict[int, str] = {}
    if not spec.instances:
        raise SpecError("the spec has no instances; nothing would run")
    for inst in spec.instances:
        if not inst.attention_ranks or not inst.expert_ranks:
            raise SpecError(f"instance {inst.name}: needs attention ranks and expert ranks")
        if inst.microbatches < 1:
            raise SpecError(f"instance {inst.name}: microbatches must be >= 1, got {inst.microbatches}")
        for r in inst.ranks:
            if not 0 <= r < spec.world_size:
                raise SpecError(f"instance {inst.name}: rank {r} out of range 0..{spec.world_size - 1}")
            if r in owner:
                raise SpecError(f"instance {inst.name}: rank {r} already belongs to instance {owner[r]}; "
                                "a rank serves one instance")
            owner[r] = inst.name
    kinds = {inst.phases for inst in spec.instances}
    if kinds != {("prefill", "decode")} and kinds != {("prefill",), ("decode",)}:
        raise SpecError("instances must all run both phases, or split into prefill-only and decode-only ones "
                        f"(got {sorted(kinds)})")


def _check_placement(inst, facts: ModelFacts) -> None:
    got = [lp.layer for lp in inst.layers]
    if got != facts.moe_layers:
        raise SpecError(f"instance {inst.name}: expert placement covers layers {got}, {facts.name} has MoE layers "
                        f"{facts.moe_layers}; the plan was compiled for another model")
    slots = inst.slots_per_rank * len(inst.expert_ranks)
    for lp in inst.layers:
        at = f"instance {inst.name} layer {lp.layer}"
        if len(lp.phy2log) != slots or len(lp.shares) != slots:
            raise SpecError(f"{at}: {len(lp.phy2log)} slots, expected {slots} (expert ranks x slots per rank)")
        bad = [e for e in lp.phy2log if not 0 <= e < facts.num_experts]
        if bad:
            raise SpecError(f"{at}: expert {bad[0]} out of range 0..{facts.num_experts - 1}")
        missing = sorted(set(range(facts.num_experts)) - set(lp.phy2log))
        if missing:
            raise SpecError(f"{at}: expert {missing[0]} has no slot; every expert needs a replica")
        total: dict[int, float] = {}
        for e, s in zip(lp.phy2log, lp.shares):
            total[e] = total.get(e, 0.0) + s
        off = [e for e, t in total.items() if abs(t - 1) > 1e-3 or t <= 0]
        if off or any(s < 0 for s in lp.shares):
            raise SpecError(f"{at}: the shares of expert {off[0] if off else '?'} must be >= 0 and sum to 1")


def launch(spec: RunSpec, *, timeout_s: float = 600.0, validated: bool = False) -> RunOutcome:
    """Validate, start the ranks, wait; RankFailure names the first rank that failed and why.

    Workers are forked from a forkserver, so a script calling this needs the usual multiprocessing
    `if __name__ == "__main__":` guard (pytest and the CLI have one).
    """
    if not validated:
        validate(spec)
    with tempfile.TemporaryDirectory(prefix="podplan-run-") as tmp:
        return _run(spec, Path(tmp), timeout_s)


def _context():
    """A forkserver that imported torch, transformers and the bundled model families once.

    Each worker is forked from it, so a rank starts in well under a second instead of paying the
    ~5 s import of transformers again (8 ranks on 2 cores would otherwise take a minute to start).
    """
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["runtime.preload"])
    return _CTX


_CTX = None


def _run(spec: RunSpec, tmp: Path, timeout_s: float) -> RunOutcome:
    job = tmp / "job.json"
    job.write_text(spec.to_json())
    write_program(program_document(spec.model), tmp / PROGRAM_FILE)  # compiled once, on meta: no rank traces
    n = spec.world_size
    # The launcher owns the rendezvous store: it binds a free port itself, so no other process can
    # take the port between choosing it and rank 0 binding it (the race of "find a free port").
    store = dist.TCPStore("127.0.0.1", 0, n, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    base = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port), "PODPLAN_CLIENT_STORE": "1",
            "WORLD_SIZE": str(n), "PODPLAN_LAUNCHER_PID": str(os.getpid()),
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # one thread per rank: ranks share the cores
    fault = os.environ.get(FAULT_ENV)
    if fault:
        base[FAULT_ENV] = fault
    ctx = _context()
    t0 = time.perf_counter()
    procs: list = []
    try:
        for r in range(n):
            env = dict(base, RANK=str(r), LOCAL_RANK=str(r))
            proc = ctx.Process(target=forked_main, args=(str(job), env, str(tmp / f"rank{r}.log")),
                               name=f"podplan-rank{r}", daemon=True)
            proc.start()
            procs.append(proc)
        _watch(procs, tmp, timeout_s)
    finally:
        _kill(procs)
        del store
    data = torch.load(tmp / "result.pt", weights_only=True)
    return RunOutcome(data["tokens"], data["logits"], data["metrics"], time.perf_counter() - t0)


def _watch(procs: list, tmp: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        codes = [p.exitcode for p in procs]
        if all(c == 0 for c in codes):
            return
        if any(c not in (None, 0) for c in codes):
            end = time.monotonic() + GRACE_S
            while time.monotonic() < end and any(p.exitcode is None for p in procs):
                time.sleep(0.05)
            _kill(procs)
            raise _culprit(procs, tmp)
        if time.monotonic() > deadline:
            _kill(procs)
            raise RankFailure(None, f"run timed out after {timeout_s:g} s with every rank alive; rerun with fewer "
                                    "tokens or a larger --timeout")
        time.sleep(0.05)


def _kill(procs: list) -> None:
    for p in procs:
        if p.exitcode is None:
            p._podplan_killed = True  # not a failure of its own
            p.kill()
    for p in procs:
        p.join()


def _culprit(procs: list, tmp: Path) -> RankFailure:
    """The rank that failed first for its own reason; peers that only lost their connection come last."""
    # (time of the report, rank, message): the earliest report of a group names the culprit
    own: list[tuple[float, int, str]] = []
    died: list[tuple[float, int, str]] = []
    secondary: list[tuple[float, int, str]] = []
    for r, p in enumerate(procs):
        err = tmp / f"rank{r}.error.json"
        if err.exists():
            rec = json.loads(err.read_text())
            (secondary if rec["secondary"] else own).append((rec["time"], r, rec["message"]))
        elif getattr(p, "_podplan_killed", False):
            continue
        elif p.exitcode is not None and p.exitcode < 0:
            died.append((0.0, r, f"rank {r} died: killed by signal {signal.Signals(-p.exitcode).name}"))
        elif p.exitcode:
            died.append((0.0, r, f"rank {r} exited with code {p.exitcode}: {_last_line(tmp / f'rank{r}.log')}"))
    for group in (own, died, secondary):
        if group:
            _, rank, message = min(group)
            return RankFailure(rank, message)
    return RankFailure(None, "a rank failed without a report; see the worker logs")


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no output)"
    return lines[-1] if lines else "(no output)"
