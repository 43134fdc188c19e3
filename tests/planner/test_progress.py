"""Progress on stderr when it is not a terminal: one timestamped line per step, nothing on stdout, and a
step that fails at once leaves only the error's line."""

from __future__ import annotations

import time

import pytest

from planner.cli import progress as progress_mod
from planner.cli.progress import LINE, Progress
from tests.conftest import run_cli


def _lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def test_one_timestamped_line_per_step(capsys):
    with Progress("compile") as p:
        p.step("tracing x")
        p.step("searching y")
    err = _lines(capsys.readouterr().err)
    assert len(err) == 2 and all(LINE.match(line) for line in err)
    assert err[0].endswith("podplan compile: tracing x") and err[1].endswith("podplan compile: searching y")


def test_a_step_that_fails_at_once_leaves_no_line(capsys):
    with pytest.raises(ValueError), Progress("balance") as p:
        p.step("balancing")
        raise ValueError("bad input found by the solver")
    assert capsys.readouterr().err == ""


def test_a_long_step_is_reported_while_it_runs(capsys, monkeypatch):
    monkeypatch.setattr(progress_mod, "GRACE_S", 0.05)
    with pytest.raises(ValueError), Progress("trace") as p:
        p.step("tracing a big model")
        time.sleep(0.5)  # still running after the grace: CI's log shows what it is doing
        assert _lines(capsys.readouterr().err)[0].endswith("podplan trace: tracing a big model")
        raise ValueError("failed late")


def test_balancer_layers_mean_the_step_is_under_way(capsys):
    from planner.balance.balancer import balance
    import numpy as np

    with Progress("balance") as p:
        p.step("balancing")
        balance(np.ones((2, 8)), 2, 4, time_limit=0.0)
        assert len(_lines(capsys.readouterr().err)) == 1  # written at the first solved layer, not at exit


def test_balance_cli_progress_goes_to_stderr_only(tmp_path):
    proc = run_cli("balance", "zipf:1.2", "--layers", "3", "--experts", "16", "--devices", "4",
                   "--slots-per-device", "5", "--time-limit", "0", "-o", str(tmp_path / "b.json"))
    assert proc.returncode == 0, proc.stderr
    err = _lines(proc.stderr)
    assert len(err) == 1 and LINE.match(err[0]) and "balancing 3 layers x 16 experts over 4 devices" in err[0]
    assert not any(LINE.match(line) for line in proc.stdout.splitlines())
