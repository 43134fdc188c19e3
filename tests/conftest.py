"""Shared test helpers: run the CLI in a subprocess the way a user does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`podplan ARGS...` as a subprocess (python -m planner), capturing text output."""
    # the checkout first, then whatever path the caller's environment adds (wheels carried beside it)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "planner", *args],
        capture_output=True, text=True, cwd=cwd or ROOT, env=env, timeout=timeout,
    )


def cli_in_process(*args: str) -> subprocess.CompletedProcess:
    """`podplan ARGS...` through main() in this process, as a CompletedProcess: the same exit code and
    output a user sees, without a new interpreter importing torch again (seconds per call)."""
    import contextlib
    import io

    from planner.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's own exits
            code = exc.code if isinstance(exc.code, int) else 2
    return subprocess.CompletedProcess(["podplan", *args], code, out.getvalue(), err.getvalue())


def error_lines(stderr: str) -> list[str]:
    """stderr without the progress lines long steps print when it is not a terminal
    (`HH:MM:SS podplan CMD: step`, planner/cli/progress.py), which may come before an error."""
    from planner.cli.progress import LINE

    lines = [line for line in stderr.splitlines() if line.strip()]
    kept = [line for line in lines if not LINE.match(line)]
    # progress only ever precedes the error: whatever is not progress ends stderr
    assert lines[len(lines) - len(kept):] == kept, stderr
    return kept


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit 2, exactly one stderr line besides step progress, last, no traceback, naming each fragment."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])


@pytest.fixture
def cli():
    return run_cli
