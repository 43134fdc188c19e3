"""Faults: a rank that raises or is killed stops the run fast, names the rank, and leaves no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from runtime.errors import RankFailure
from runtime.launch import launch
from runtime.worker import FAULT_ENV
from tests.conftest import ROOT
from tests.runtime.conftest import alive, colocated, disaggregated, worker_pids

pytestmark = pytest.mark.slow

RUN = dict(prompts=4, prompt_len=4, new_tokens=4)


def _fail(monkeypatch, spec, fault: str) -> tuple[RankFailure, float]:
    monkeypatch.setenv(FAULT_ENV, fault)
    t0 = time.monotonic()
    with pytest.raises(RankFailure) as info:
        launch(spec, timeout_s=60)
    elapsed = time.monotonic() - t0
    assert worker_pids() == [], "workers outlived the failed run"
    return info.value, elapsed


def test_a_rank_that_raises_is_named_with_stage_and_node(monkeypatch):
    spec = disaggregated("tiny-qwen3-moe", 2, 2, **RUN)
    exc, elapsed = _fail(monkeypatch, spec, "1:2:raise")
    assert exc.rank == 1
    assert str(exc) == ("rank 1, stage decode step 2 layer 0, while executing layer0_routed_experts: "
                        "RuntimeError: injected fault (PODPLAN_FAULT)")
    assert elapsed < 30


def test_an_expert_rank_killed_mid_run_is_named(monkeypatch):
    spec = disaggregated("tiny-mixtral", 2, 2, **RUN)
    exc, elapsed = _fail(monkeypatch, spec, "3:1:kill")
    assert exc.rank == 3 and str(exc) == "rank 3 died: killed by signal SIGKILL"
    assert elapsed < 30


def test_rank_zero_killed_during_prefill(monkeypatch):
    exc, elapsed = _fail(monkeypatch, colocated("tiny-olmoe", 4, **RUN), "0:0:kill")
    assert exc.rank == 0 and "SIGKILL" in str(exc)
    assert elapsed < 30


def test_killing_the_launcher_leaves_no_workers(tmp_path):
    """SIGKILL `podplan run` while its workers run (stalled by a hung rank): they exit within seconds."""
    from planner.ir.plan import write_plan
    from tests.plan_factory import tiny_plan

    plan = tmp_path / "plan.json"
    write_plan(tiny_plan("tiny-mixtral", prefill_devices=0, decode_devices=3), plan)
    env = dict(os.environ, PYTHONPATH=str(ROOT), **{FAULT_ENV: "1:2:hang"})  # the run stalls at step 2
    proc = subprocess.Popen([sys.executable, "-m", "planner", "run", str(plan), "--new-tokens", "4",
                             "--prompt-len", "2", "--prompts", "3", "--no-check", "--json"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = _wait_for_workers(proc.pid, 3, timeout=90)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(alive(p) for p in workers):
        time.sleep(0.2)
    assert not [p for p in workers if alive(p)], "orphan workers after the launcher was killed"


def _wait_for_workers(launcher: int, n: int, timeout: float) -> list[int]:
    """Pids of the launcher's forkserver children once n of them run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        server = [p for p in _children(launcher)]
        workers = [w for s in server for w in _children(s)]
        if len(workers) >= n:
            time.sleep(1.0)  # let them get past start-up into the generation loop
            return workers
        time.sleep(0.2)
    raise AssertionError("the launcher never started its workers")


def _children(pid: int) -> list[int]:
    out = []
    for stat in os.listdir("/proc"):
        if not stat.isdigit():
            continue
        try:
            with open(f"/proc/{stat}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat))
    return out


def test_a_hung_rank_hits_the_timeout(monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "0:1:hang")
    with pytest.raises(RankFailure, match="timed out after 8 s"):
        launch(colocated("tiny-qwen3-moe", 2, **RUN), timeout_s=8)
    assert worker_pids() == []
