"""mypy stays clean on the typed packages: the `[tool.mypy]` contract in pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The packages held to zero mypy errors: all four, runtime included.
PACKAGES = ("costmodels", "passes", "planner", "runtime")


def test_mypy_is_clean():
    # requirements.lock pins mypy, so `make test` and CI always have it; without it this fails
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", *PACKAGES],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, f"mypy {' '.join(PACKAGES)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
