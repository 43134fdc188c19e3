"""Checks of command-line values shared by several commands, each failing with one line (exit 2)."""

from __future__ import annotations

import math
from pathlib import Path

from costmodels.errors import InputError
from planner.ir.fileio import check_output_path


def output_file(command: str, path: str, example: str) -> Path:
    """The -o path of a command that writes one file, checked before any work (folder, parent, writable)."""
    return check_output_path(path, flag="-o")


# Seeds the generators and solvers take: 32-bit (numpy's legacy seeding and CP-SAT's random_seed).
MAX_SEED = 2**32 - 1


def at_most(command: str, flag: str, value: int | None, high: int) -> None:
    """An optional integer flag must be <= `high` when given."""
    if value is not None and value > high:
        raise InputError(f"{command}: {flag} must be <= {high} (got {value})")


def finite(command: str, flag: str, value: float | None) -> None:
    """An optional float flag must be a finite number (argparse's float() takes 'inf' and 'nan')."""
    if value is not None and not math.isfinite(value):
        raise InputError(f"{command}: {flag} must be a finite number (got {value})")


def at_least(command: str, flag: str, value: int | None, low: int) -> None:
    """An optional integer flag must be >= `low` when given."""
    if value is not None and value < low:
        raise InputError(f"{command}: {flag} must be >= {low} (got {value})")


def decode_mode(text: str) -> str:
    """A --mode / --decode-mode value (argparse `type`); 'afd', the old name of disaggregated, is still read."""
    return "disaggregated" if text == "afd" else text
