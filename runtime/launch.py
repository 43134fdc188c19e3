"""Start one worker process per rank, watch them, and collect the result or name the rank that failed.

Everything that can be checked is checked before a process starts (`validate`): the host can run
the ranks, the spec matches the model, the weights file fits, and the dry run finds no deadlock.
A rank that raises or dies stops the whole run within seconds; no worker outlives the launcher.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from planner.frontend.program_io import PROGRAM_FILE, meta_program, meta_trace, program_document, write_program
from runtime.errors import RankFailure, SpecError
from runtime.parts import check_weights
from runtime.schedule import dry_run, programs
from runtime.spec import RunSpec
from runtime.fast_paths import FAST_PATHS_ENV
from runtime.worker import COLLECTIVE_TIMEOUT_S, FAULT_ENV, KERNEL_PROFILE_ENV, forked_main

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
    traced = meta_trace(spec.model)  # the same trace the program document is compiled from
    cfg = traced.config
    shared = any(role == "shared_experts" for role, _ in traced.roles.leaves.values())
    facts = ModelFacts(traced.source.name, sorted(traced.roles.experts), traced.roles.num_experts, cfg.vocab_size,
                       int(getattr(cfg, "max_position_embeddings", 1 << 30)), shared)
    if shared and any(_has_remote_shared(inst) for inst in spec.instances):
        from runtime.interpreter import check_remote_shared

        check_remote_shared(meta_program(spec.model), facts.name)
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
        raise SpecError(f"the run needs {n} CUDA GPUs (one per rank, NCCL), this host has {have}; run it on a host "
                        f"with {n} GPUs, or compile for local:{n} to run on CPU processes")
    if spec.backend == "nccl":
        return  # ranks hold their weights on their GPUs; host memory per rank is not the limit
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
    with _terminate_as_exit(), tempfile.TemporaryDirectory(prefix="podplan-run-") as tmp:
        return _run(spec, Path(tmp), timeout_s)


@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """SIGTERM / SIGHUP unwind the launcher like Ctrl-C does: the ranks are killed and the temporary
    run folder removed by the `finally` blocks, instead of the process vanishing and leaving both."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread; the caller owns signals there
        return

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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
    # always set: the forkserver keeps the environment it started with, and a fault left in it from an
    # earlier launch would otherwise fire in every later run of this process
    base[FAULT_ENV] = os.environ.get(FAULT_ENV, "")
    base[KERNEL_PROFILE_ENV] = os.environ.get(KERNEL_PROFILE_ENV, "")
    base[FAST_PATHS_ENV] = os.environ.get(FAST_PATHS_ENV, "")
    ctx = _context()
    t0 = time.perf_counter()
    procs: list = []
    try:
        for r in range(n):
            env = dict(base, RANK=str(r), LOCAL_RANK=str(r))
            proc = ctx.Process(target=beating_main, args=(str(job), env, str(tmp / f"rank{r}.log"),
                                                          str(tmp / f"rank{r}.beat")),
                               name=f"podplan-rank{r}", daemon=True)
            try:
                proc.start()
            except OSError as exc:  # the forkserver's unix socket lives under TMPDIR (at most 107 bytes)
                if "AF_UNIX path too long" not in str(exc):
                    raise
                raise SpecError(f"TMPDIR {tempfile.gettempdir()}: too long a path for the launcher's unix socket; "
                                "set TMPDIR to a shorter folder (e.g. /tmp)") from None
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
            # peers of a stopped or stuck rank fail in their collectives: if no rank failed for its own
            # reason, blame the one that stopped making progress (read before the rest are killed)
            stopped, stuck = _stopped(procs), _stuck(procs, tmp)
            end = time.monotonic() + GRACE_S
            while time.monotonic() < end and any(p.exitcode is None for p in procs):
                time.sleep(0.05)
            _kill(procs)
            if stopped:
                raise _stopped_failure(stopped, "the others failed waiting for it")
            raise _culprit(procs, tmp, stuck)
        if time.monotonic() > deadline:
            stopped, stuck = _stopped(procs), _stuck(procs, tmp)
            _kill(procs)
            if stopped:
                raise _stopped_failure(stopped, f"the run timed out after {timeout_s:g} s")
            if stuck:
                raise _stuck_failure(stuck, f"the run timed out after {timeout_s:g} s")
            raise RankFailure(None, f"run timed out after {timeout_s:g} s with every rank alive; rerun with fewer "
                                    "tokens or a larger --timeout")
        time.sleep(0.05)


def _stopped(procs: list) -> list[int]:
    """Ranks whose process is stopped (SIGSTOP, a debugger, job control): alive, but making no progress."""
    out = []
    for r, p in enumerate(procs):
        if p.exitcode is not None or p.pid is None:
            continue
        try:
            state = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state in ("T", "t"):
            out.append(r)
    return out


def _stopped_failure(stopped: list[int], what: str) -> RankFailure:
    r = stopped[0]
    more = f" (and {len(stopped) - 1} more)" if len(stopped) > 1 else ""
    return RankFailure(r, f"rank {r}{more} stopped making progress: its process was stopped (SIGSTOP or a "
                          f"debugger); {what}")


def _kill(procs: list) -> None:
    for p in procs:
        if p.exitcode is None:
            p._podplan_killed = True  # not a failure of its own
            p.kill()
    for p in procs:
        p.join()


# --- heartbeats: each rank says where its main thread is and since when -----------------------------

# A rank whose main thread sits at one place outside communication this long has stopped making progress.
STALL_S = 5.0
BEAT_S = 0.5


def beating_main(job: str, env: dict[str, str], log_path: str, beat_path: str) -> None:
    """A worker (`forked_main`) with a heartbeat thread: the launcher learns which rank is stuck."""
    main_ident = threading.main_thread().ident
    threading.Thread(target=_beat, args=(Path(beat_path), main_ident), name="podplan-heartbeat",
                     daemon=True).start()
    forked_main(job, env, log_path)


def _beat(path: Path, main_ident: int | None) -> None:
    """Every BEAT_S: the main thread's place (innermost runtime frame), whether it waits on peers
    (inside torch.distributed or runtime.exchange) and since when it has been there. A rank hung
    outside communication keeps one place while its peers wait for it."""
    last, since = None, time.time()
    tmp = path.with_suffix(".tmp")
    while True:
        frame = sys._current_frames().get(main_ident) if main_ident is not None else None
        stack = []
        while frame is not None:
            stack.append((frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name))
            frame = frame.f_back
        now = time.time()
        place = tuple(stack[:4])
        if place != last:
            last, since = place, now
        waiting = any("torch/distributed" in f or f.endswith("runtime/exchange.py") for f, _, _ in stack)
        ours = next(((f, n, c) for f, n, c in stack if "/runtime/" in f), stack[0] if stack else ("?", 0, "?"))
        where = f"{Path(ours[0]).name}:{ours[1]} in {ours[2]}"
        try:
            tmp.write_text(json.dumps({"time": now, "since": since, "waiting": waiting, "where": where}))
            os.replace(tmp, path)
        except OSError:
            return  # the run folder is gone: the launcher has finished
        time.sleep(BEAT_S)


def _stuck(procs: list, tmp: Path) -> list[tuple[int, str, float]]:
    """(rank, where, seconds) of live ranks stalled outside communication, when some peer waits on them."""
    now = time.time()
    stalled, waiting = [], 0
    for r, p in enumerate(procs):
        if p.exitcode is not None:
            continue
        try:
            beat = json.loads((tmp / f"rank{r}.beat").read_text())
            fresh = now - float(beat["time"]) < STALL_S
            stalled_for = now - float(beat["since"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not fresh:  # the heartbeat itself stopped: the process holds the GIL or is frozen
            stalled.append((r, "no heartbeat", now - float(beat["time"])))
        elif beat["waiting"]:
            waiting += 1
        elif stalled_for >= STALL_S:
            stalled.append((r, str(beat["where"]), stalled_for))
    return stalled if waiting else []


def _stuck_failure(stuck: list[tuple[int, str, float]], what: str) -> RankFailure:
    r, where, seconds = stuck[0]
    more = f" (and {len(stuck) - 1} more)" if len(stuck) > 1 else ""
    return RankFailure(r, f"rank {r}{more} stopped making progress ({where}, for {seconds:.0f} s) while its peers "
                          f"wait for it; {what}")


def _culprit(procs: list, tmp: Path, stuck: list[tuple[int, str, float]] | None = None) -> RankFailure:
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
    if stuck and not own and not died:  # only lost connections reported: the stuck rank caused them
        return _stuck_failure(stuck, "the others failed waiting for it")
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
