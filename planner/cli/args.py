"""Checks of command-line values shared by several commands, each failing with one line (exit 2)."""

from __future__ import annotations

from pathlib import Path

from costmodels.errors import InputError


def output_file(command: str, path: str, example: str) -> Path:
    """The -o path of a command that writes one file; refused before any work if it is a folder."""
    out = Path(path)
    if out.is_dir():
        raise InputError(f"{command}: output {out} is a directory; pass a file path such as {out / example}")
    return out


def at_least(command: str, flag: str, value: int | None, low: int) -> None:
    """An optional integer flag must be >= `low` when given."""
    if value is not None and value < low:
        raise InputError(f"{command}: {flag} must be >= {low} (got {value})")


def decode_mode(text: str) -> str:
    """A --mode / --decode-mode value (argparse `type`); 'afd', the old name of disaggregated, is still read."""
    return "disaggregated" if text == "afd" else text
