"""A launcher stopped by SIGTERM (a scheduler, `kill`) unwinds: ranks killed, its temporary run folder removed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "plans" / "tiny-deepseek-v3.local-8.json"


@pytest.fixture
def short_tmp():
    """A TMPDIR short enough for the forkserver's unix socket (pytest's own tmp_path under xdist is not)."""
    path = Path(tempfile.mkdtemp(prefix="pp-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _descendants(pid: int) -> set[int]:
    """Live processes below `pid` (by parent id, read from /proc)."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parent[int(stat.parent.name)] = int(fields[1])
    out: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {c for c, p in parent.items() if p in frontier} - out
        out |= frontier
    return out


def _alive(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_terminated_launcher_kills_its_ranks_and_removes_its_run_folder(sig, short_tmp):
    tmp = short_tmp
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp))
    proc = subprocess.Popen(
        [sys.executable, "-m", "planner", "run", str(TINY), "--prompts", "8", "--prompt-len", "8",
         "--new-tokens", "64", "--no-check"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            runs = list(tmp.glob("podplan-run-*"))
            if runs and len(list(runs[0].glob("rank*.log"))) == 8:  # every rank started
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()
        children = _descendants(proc.pid)
        assert children, "the ranks should be running"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, (proc.returncode, err)
    assert "Traceback" not in err, err
    assert "terminated" in err.strip().splitlines()[-1]
    assert list(tmp.glob("podplan-run-*")) == []  # the run folder is gone
    end = time.monotonic() + 15
    while time.monotonic() < end and any(_alive(p) for p in children):
        time.sleep(0.1)
    assert not [p for p in children if _alive(p)], "a rank outlived its launcher"


def _pid_with_open(path: Path) -> int | None:
    """The process that has `path` open (a rank holds its rank<R>.log)."""
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                if os.readlink(fd) == str(path):
                    return int(fd_dir.parent.name)
        except OSError:
            continue
    return None


@pytest.mark.slow
def test_a_stopped_rank_is_named_at_the_timeout(short_tmp):
    """A rank that stops (SIGSTOP) stalls its peers in their collectives: the launcher names it, not 'every
    rank alive' and not a peer."""
    tmp = short_tmp
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp))
    proc = subprocess.Popen(
        [sys.executable, "-m", "planner", "run", str(TINY), "--prompts", "8", "--prompt-len", "8",
         "--new-tokens", "48", "--no-check", "--timeout", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    victim = None
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None and victim is None:
            runs = list(tmp.glob("podplan-run-*"))
            if runs and len(list(runs[0].glob("rank*.log"))) == 8:
                victim = _pid_with_open(runs[0] / "rank3.log")
            time.sleep(0.1)
        assert victim is not None and proc.poll() is None, "the ranks never started"
        os.kill(victim, signal.SIGSTOP)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, (proc.returncode, err)
    last = err.strip().splitlines()[-1]
    assert "rank 3 stopped making progress" in last and "timed out after" in last, err
    assert not _alive(victim)


@pytest.mark.slow
def test_a_hung_rank_is_named_by_its_heartbeat(monkeypatch):
    """A rank hung outside communication (the `hang` fault: a long sleep) keeps its place while its peers
    wait in their collectives: the timeout names it and where it is, not 'every rank alive'."""
    from runtime.errors import RankFailure
    from runtime.launch import launch
    from runtime.worker import FAULT_ENV
    from tests.runtime.conftest import colocated, worker_pids

    monkeypatch.setenv(FAULT_ENV, "1:1:hang")
    with pytest.raises(RankFailure, match=r"rank 1 stopped making progress \(worker\.py:\d+ in _fire, for \d+ s\)"
                       ) as info:
        launch(colocated("tiny-qwen3-moe", 2, prompts=2, prompt_len=4, new_tokens=3), timeout_s=30)
    assert info.value.rank == 1 and "timed out after 30 s" in str(info.value)
    assert worker_pids() == []


def test_a_temp_folder_too_long_for_the_socket_is_one_line(tmp_path):
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(deep))
    proc = subprocess.run([sys.executable, "-m", "planner", "run", str(TINY), "--new-tokens", "2"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("running ")]
    assert proc.returncode == 2 and len(lines) == 1 and "set TMPDIR to a shorter folder" in lines[0], proc.stderr
    assert not [p for p in deep.iterdir() if p.name.startswith("podplan")]  # its run folder is gone (torch may leave its own caches)
