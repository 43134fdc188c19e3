"""What every pass receives besides the graph: the model's shape and the traced signature."""

from __future__ import annotations

from dataclasses import dataclass, field

from costmodels.model_shape import ModelShape


@dataclass(frozen=True)
class PassContext:
    """Inputs shared by a pipeline's passes.

    batch, seq: the signature traced (sequences, new tokens per sequence).
    past: tokens already in the KV cache (0 for prefill; the KV length for decode).
    options: per-pass options by pass name (e.g. {"expert-decompose": {"partition": [[0, 1], [2, 3]]}}).
    """

    shape: ModelShape
    batch: int = 1
    seq: int = 1
    past: int = 0
    options: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq
