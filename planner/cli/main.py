"""The `podplan` command line: one subcommand per capability, errors as one line + exit 2."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
from typing import NoReturn, Sequence

from costmodels.errors import PodplanError

# Subcommands in the order `podplan --help` lists them; each is planner.cli.<name>
# exporting `register(subparsers)`, which adds its parser and sets `func(args) -> int`.
COMMANDS = (
    "models",
    "trace",
    "estimate",
    "balance",
    "compile",
    "show",
    "diff",
    "simulate",
    "run",
    "replan",
    "export",
    "profile",
)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (not usage + error) and exits 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="podplan", description=__doc__)
    from planner import __version__

    parser.add_argument("--version", action="version", version=f"podplan {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"planner.cli.{name}").register(sub)
    return parser


# Set by the SIGINT handler `main` installs: Ctrl-C inside an import (torch, transformers, ortools and
# numpy load lazily, deep inside commands) can surface as another error (an ImportError, or an
# AttributeError from a half-initialised numpy module), so the signal itself is what counts.
_sigint_seen = False


def _on_sigint(signum: int, frame: object) -> None:
    global _sigint_seen
    _sigint_seen = True
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        return _main(argv)
    previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGINT, previous)


def _main(argv: Sequence[str] | None) -> int:
    try:
        parser = build_parser()  # imports every command: the slow part of start-up
        args = parser.parse_args(argv)
    except Exception as exc:
        if _interrupted(exc):
            print("podplan: interrupted", file=sys.stderr)
            return 130
        raise
    except KeyboardInterrupt:
        print("podplan: interrupted", file=sys.stderr)
        return 130
    try:
        return int(args.func(args) or 0)
    except PodplanError as exc:
        print(f"podplan {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"podplan {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:
        if _interrupted(exc):
            print(f"podplan {args.command}: interrupted", file=sys.stderr)
            return 130
        raise


def _interrupted(exc: BaseException) -> bool:
    """True when Ctrl-C caused `exc`: the handler saw the signal, or a KeyboardInterrupt is in its chain
    (inside a native module's import it surfaces as ImportError("initialization failed"))."""
    if _sigint_seen:
        return True
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, KeyboardInterrupt):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


if __name__ == "__main__":
    sys.exit(main())
