"""Request streams: arrival processes (Poisson, gamma), length specs and the JSONL trace format.

A trace file holds one JSON object a line: {"arrival_s": 0.0, "input_len": 4096, "output_len": 1024}
(docs/simulate.md gives the one-line conversion of the public Azure LLM inference trace).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from costmodels.errors import InputError

ARRIVALS_SYNTAX = ("use poisson:RATE, gamma:RATE:CV or a JSONL trace FILE (RATE in requests/s, or 'design' for the "
                   "plan's design rate)")
LENGTHS_SYNTAX = "use fixed:IN:OUT or a JSONL trace FILE"
# Requests a stream may hold: far above a 10-minute run at a pod's rate, low enough to fit in memory.
MAX_REQUESTS = 20_000_000


@dataclass(frozen=True)
class Requests:
    """A request stream, sorted by arrival. arrival: [n] s; input_len, output_len: [n] tokens."""

    arrival: np.ndarray
    input_len: np.ndarray
    output_len: np.ndarray

    def __len__(self) -> int:
        return int(self.arrival.size)


@dataclass(frozen=True)
class Trace:
    """A trace file's rows (arrival times may be absent when it only gives lengths)."""

    path: str
    arrival: np.ndarray | None
    input_len: np.ndarray
    output_len: np.ndarray

    @property
    def rate(self) -> float:
        """Mean arrival rate of the trace, requests/s."""
        if self.arrival is None or self.arrival.size < 2 or self.arrival[-1] <= self.arrival[0]:
            raise InputError(f"{self.path}: needs two or more distinct arrival_s values to have a rate")
        return (self.arrival.size - 1) / float(self.arrival[-1] - self.arrival[0])


@dataclass(frozen=True)
class ArrivalSpec:
    """poisson (cv 1) or gamma inter-arrival times at `rate` requests/s, or a trace's own times."""

    kind: str  # "poisson", "gamma" or "trace"
    rate: float  # requests/s; 0 = the plan's design rate (resolved by the caller with `at_rate`)
    cv: float = 1.0
    trace: Trace | None = None

    def at_rate(self, rate: float) -> ArrivalSpec:
        """The same process at another rate (a trace is time-scaled to it)."""
        return ArrivalSpec(self.kind, rate, self.cv, self.trace)

    @property
    def span(self) -> float:
        """Seconds a trace covers at `rate` (last arrival plus a mean gap); unbounded for generators."""
        if self.kind != "trace":
            return math.inf
        assert self.trace is not None and self.trace.arrival is not None
        a = self.trace.arrival
        return float(a[-1] - a[0]) * self.trace.rate / self.rate + 1.0 / self.rate

    @property
    def text(self) -> str:
        if self.kind == "trace":
            assert self.trace is not None
            return f"{self.trace.path} (scaled to {self.rate:g} req/s)" if self.rate != self.trace.rate \
                else self.trace.path
        return f"{self.kind}:{self.rate:g}" + (f":{self.cv:g}" if self.kind == "gamma" else "")


@dataclass(frozen=True)
class LengthSpec:
    """Fixed lengths, or lengths drawn (with replacement, seeded) from a trace's rows."""

    input_len: int = 0
    output_len: int = 0
    trace: Trace | None = None

    @property
    def text(self) -> str:
        if self.trace is not None:
            return self.trace.path
        return f"fixed:{self.input_len}:{self.output_len}" if self.input_len else "the arrivals trace's"


def _rate(text: str) -> float:
    return 0.0 if text == "design" else _number(text, "rate", "--arrivals", ARRIVALS_SYNTAX)


def _number(text: str, what: str, flag: str, syntax: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise InputError(f"{flag} {what} {text!r} is not a number; {syntax}") from None
    if not math.isfinite(x) or x <= 0:
        raise InputError(f"{flag} {what} {text!r} must be a finite number > 0; {syntax}")
    return x


def _int(text: str, what: str, flag: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise InputError(f"{flag} {what} {text!r} must be a whole number >= 1; {LENGTHS_SYNTAX}")
    return int(text)


def _is_spec(text: str, kinds: tuple[str, ...]) -> bool:
    return text.split(":", 1)[0] in kinds and not Path(text).exists()


def parse_arrivals(text: str) -> ArrivalSpec:
    """--arrivals poisson:RATE | gamma:RATE:CV | FILE."""
    if _is_spec(text, ("poisson", "gamma")):
        parts = text.split(":")
        if parts[0] == "poisson":
            if len(parts) != 2:
                raise InputError(f"--arrivals {text!r}: poisson takes one rate; {ARRIVALS_SYNTAX}")
            return ArrivalSpec("poisson", _rate(parts[1]))
        if len(parts) != 3:
            raise InputError(f"--arrivals {text!r}: gamma takes a rate and a CV; {ARRIVALS_SYNTAX}")
        return ArrivalSpec("gamma", _rate(parts[1]), _number(parts[2], "CV", "--arrivals", ARRIVALS_SYNTAX))
    trace = read_trace(text, "--arrivals", need_arrivals=True)
    return ArrivalSpec("trace", trace.rate, trace=trace)


def parse_lengths(text: str) -> LengthSpec:
    """--lengths fixed:IN:OUT | FILE."""
    if _is_spec(text, ("fixed",)):
        parts = text.split(":")
        if len(parts) != 3:
            raise InputError(f"--lengths {text!r}: fixed takes IN and OUT; {LENGTHS_SYNTAX}")
        return LengthSpec(_int(parts[1], "IN", "--lengths"), _int(parts[2], "OUT", "--lengths"))
    return LengthSpec(trace=read_trace(text, "--lengths", need_arrivals=False))


def read_trace(path: str, flag: str, *, need_arrivals: bool) -> Trace:
    """Read a JSONL trace; any bad line is one InputError naming the file, line and field."""
    p = Path(path)
    syntax = ARRIVALS_SYNTAX if flag == "--arrivals" else LENGTHS_SYNTAX
    if not p.is_file():
        raise InputError(f"{flag} {path}: no such trace file; {syntax}")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{flag} {path}: cannot read it as UTF-8 text ({exc.__class__.__name__})") from None
    arrival: list[float] = []
    inp: list[int] = []
    out: list[int] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{flag} {path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: not JSON ({exc.msg}); each line is "
                             '{"arrival_s": S, "input_len": N, "output_len": N}') from None
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected a JSON object with arrival_s, input_len, output_len")
        for key in ("input_len", "output_len"):
            v = row.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{where}: {key} {v!r} must be a whole number >= 1")
        inp.append(row["input_len"])
        out.append(row["output_len"])
        if need_arrivals:
            t = row.get("arrival_s")
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
                raise InputError(f"{where}: arrival_s {t!r} must be a number of seconds >= 0")
            if arrival and t < arrival[-1]:
                raise InputError(f"{where}: arrival_s {t} is before the line above ({arrival[-1]}); sort the "
                                 "trace by arrival_s")
            arrival.append(float(t))
        if len(inp) > MAX_REQUESTS:
            raise InputError(f"{where}: more than {MAX_REQUESTS} requests; cut the trace")
    if not inp:
        raise InputError(f"{flag} {path}: no requests in the trace")
    return Trace(path, np.array(arrival) if need_arrivals else None, np.array(inp, dtype=np.int64),
                 np.array(out, dtype=np.int64))


def generate(arrivals: ArrivalSpec, lengths: LengthSpec, duration: float, seed: int) -> Requests:
    """The requests arriving in [0, duration): times from `arrivals`, lengths from `lengths` (seeded).

    A trace's arrivals are shifted to start at 0 and time-scaled to `arrivals.rate`; its lengths go
    with its times unless `lengths` says otherwise.
    """
    assert arrivals.rate > 0, "resolve a design rate with ArrivalSpec.at_rate before generating"
    expected = arrivals.rate * duration
    if expected > MAX_REQUESTS:
        raise InputError(f"--duration {duration:g} at {arrivals.rate:g} req/s is {expected:.3g} requests, more than "
                         f"{MAX_REQUESTS}; shorten --duration")
    rng = np.random.default_rng([seed, 0])
    if arrivals.kind == "trace":
        tr = arrivals.trace
        assert tr is not None and tr.arrival is not None
        t = (tr.arrival - tr.arrival[0]) * (tr.rate / arrivals.rate)
        keep = t < duration
        t = t[keep]
        inp, out = tr.input_len[keep], tr.output_len[keep]
    else:
        t = _times(arrivals, duration, rng)
        inp = out = np.zeros(0, dtype=np.int64)
    n = t.size
    if lengths.trace is not None:
        pick = np.random.default_rng([seed, 1]).integers(0, lengths.trace.input_len.size, n)
        inp, out = lengths.trace.input_len[pick], lengths.trace.output_len[pick]
    elif lengths.input_len:
        inp = np.full(n, lengths.input_len, dtype=np.int64)
        out = np.full(n, lengths.output_len, dtype=np.int64)
    return Requests(t, inp.astype(np.int64), out.astype(np.int64))


def _times(a: ArrivalSpec, duration: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival times in [0, duration): cumulative inter-arrival gaps (exponential, or gamma of mean
    1/rate and the given coefficient of variation)."""
    parts: list[np.ndarray] = []
    t0 = 0.0
    chunk = max(1024, int(a.rate * duration * 1.05) + 64)
    while t0 < duration:
        if a.kind == "poisson":
            gaps = rng.exponential(1.0 / a.rate, chunk)
        else:
            k = 1.0 / (a.cv * a.cv)
            gaps = rng.gamma(k, 1.0 / (a.rate * k), chunk)
        t = t0 + np.cumsum(gaps)
        parts.append(t)
        t0 = float(t[-1])
    times = np.concatenate(parts)
    return times[times < duration]
