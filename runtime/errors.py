"""Runtime errors: bad specs are PlanErrors (exit 2, before any process starts); failures name the rank."""

from __future__ import annotations

from planner.ir.errors import PlanError


class SpecError(PlanError):
    """A plan or spec the runtime cannot run here (topology, size, model mismatch, deadlock)."""


class StageError(RuntimeError):
    """Raised inside a worker: what failed, where (rank, stage, fx node)."""

    def __init__(self, rank: int, stage: str, node: str, cause: str, *, comm: bool = False):
        lines = cause.strip().splitlines()
        cause = lines[0] if lines else cause  # `podplan run` prints one line
        self.rank, self.stage, self.node, self.cause = rank, stage, node, cause
        self.comm = comm  # failed inside a communication: most likely a peer died first
        super().__init__(f"rank {rank}, stage {stage}, while executing {node}: {cause}")


class RankFailure(Exception):
    """A run that failed on some rank; the message is the one line `podplan run` prints."""

    def __init__(self, rank: int | None, message: str):
        self.rank = rank
        super().__init__(message)
