"""Progress of long steps on stderr (stdout keeps only the command's result).

In a terminal: a live status line, the steps logged as they start, and while the balancer runs, the
layers solved with an ETA. Elsewhere (CI, make, a pipe): one timestamped line per step,
`HH:MM:SS podplan COMMAND: STEP`, and nothing per layer. A step's line is written once the step has
run for GRACE_S, or when the next step starts, or when the command succeeds: input the step rejects at
once (a bad flag found inside the solver) leaves only the error's one line, as before.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from contextlib import AbstractContextManager
from contextvars import Token
from types import TracebackType

from planner.cli.console import stderr_console

# What a progress line looks like when stderr is not a terminal (tests tell them from the error line).
LINE = re.compile(r"^\d\d:\d\d:\d\d podplan [a-z-]+: ")
GRACE_S = 1.0


class Progress(AbstractContextManager["Progress"]):
    """`with Progress("compile") as p: p.step("tracing x")`; per-layer reports come from the balancer."""

    def __init__(self, command: str) -> None:
        self.command = command
        self.console = stderr_console()
        self.tty = self.console.is_terminal
        self._status = self.console.status("") if self.tty else None
        self._step = ""
        self._started = time.perf_counter()
        self._token: Token | None = None
        self._pending: str | None = None  # the current step's line, not written yet
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> Progress:
        from planner.balance.balancer import LAYER_PROGRESS

        if self._status is not None:
            self._status.__enter__()
        self._token = LAYER_PROGRESS.set(self.layers)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        from planner.balance.balancer import LAYER_PROGRESS

        if self._token is not None:
            LAYER_PROGRESS.reset(self._token)
        if self._status is not None:
            self._status.__exit__(kind, exc, tb)
        if kind is None:
            self._flush()
        else:
            self._drop()  # the error's line says what happened to this step

    def step(self, message: str) -> None:
        """A step starts: logged in a terminal, one `HH:MM:SS podplan CMD: message` line elsewhere."""
        self._step, self._started = message, time.perf_counter()
        if self._status is not None:
            self._status.update(message)
            self.console.log(message)
        else:
            self._flush()
            with self._lock:
                self._pending = f"{time.strftime('%H:%M:%S')} podplan {self.command}: {message}"
                self._timer = threading.Timer(GRACE_S, self._flush)
                self._timer.daemon = True
                self._timer.start()

    def _flush(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            line, self._pending = self._pending, None
        if line is not None:
            print(line, file=sys.stderr, flush=True)

    def _drop(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._pending = None

    def layers(self, done: int, total: int) -> None:
        """The balancer solved `done` of `total` layers of the current step: the status line's ETA in a
        terminal; elsewhere the step is under way (its input passed), so its line is due now."""
        if self._status is None:
            self._flush()
            return
        spent = time.perf_counter() - self._started
        eta = spent / done * (total - done) if done else 0.0
        self._status.update(f"layer {done}/{total}, ETA {eta:.0f} s: {self._step}")
