"""Checks of command-line values shared by several commands, each failing with one line (exit 2)."""

from __future__ import annotations

from pathlib import Path

from costmodels.errors import InputError
from planner.ir.fileio import check_output_path


def output_file(command: str, path: str, example: str) -> Path:
    """The -o path of a command that writes one file, checked before any work (folder, parent, writable)."""
    return check_output_path(path, flag="-o")


def at_least(command: str, flag: str, value: int | None, low: int) -> None:
    """An optional integer flag must be >= `low` when given."""
    if value is not None and value < low:
        raise InputError(f"{command}: {flag} must be >= {low} (got {value})")
