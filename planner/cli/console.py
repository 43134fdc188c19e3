"""Rich consoles for the CLI: tables on stdout, progress on stderr, wide enough when piped."""

from __future__ import annotations

import shutil
import sys

from rich.console import Console


def stdout_console() -> Console:
    # rich falls back to 80 columns when stdout is not a terminal, which wraps every table
    width = shutil.get_terminal_size((160, 40)).columns if sys.stdout.isatty() else 160
    return Console(width=width, highlight=False)


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False, log_path=False)
