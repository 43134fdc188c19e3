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


def single_hardware(command: str, plan, path: str, fix: str) -> None:
    """Commands that run, export, simulate or re-place a plan model one kind of hardware: a plan for a
    mixed topology (instances on different groups) is refused with what to do instead."""
    groups = plan.topology.groups
    if not groups:
        return
    names = ", ".join(g.name for g in groups)
    # the CLI prefixes "podplan COMMAND: error:", so the line starts with the subject
    raise InputError(f"{path} is a plan for the mixed topology {plan.topology.name}, and {command} handles plans "
                     f"for one kind of hardware ({fix}); compile for one group instead: {names}")


def single_topology(command: str, name: str) -> None:
    """A --topology value naming hardware groups ('a+b') where a command takes one kind of hardware."""
    if "+" not in name:
        return
    raise InputError(f"--topology {name} mixes hardware groups, and {command} models one kind of "
                     "hardware; give one group (e.g. --topology " + name.split("+")[0].strip() + "), or use "
                     "`podplan compile` for the mixed topology")
