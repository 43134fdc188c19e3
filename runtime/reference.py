"""The monolithic reference: the same transformers model, same weights, greedy decoding in one process."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime.parts import build_full
from runtime.spec import RunSpec, prompts_of


@dataclass(frozen=True)
class Check:
    """The run against the reference: token agreement and the largest logit difference."""

    tokens_match: bool
    max_abs_diff: float
    tolerance: float
    mismatches: int  # (prompt, step) pairs whose token differs

    @property
    def ok(self) -> bool:
        return self.tokens_match and self.max_abs_diff <= self.tolerance


def greedy(spec: RunSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [N, T] and last-position logits [N, T, V] (fp32) of the monolithic model."""
    from transformers import DynamicCache

    torch.set_num_threads(max(1, torch.get_num_threads()))
    _, model = build_full(spec)
    ids = prompts_of(spec, model.config.vocab_size)
    cache = DynamicCache(config=model.config)
    tokens, logits = [], []
    with torch.no_grad():
        for step in range(spec.new_tokens):
            out = model(input_ids=ids, past_key_values=cache, use_cache=True)
            last = out.logits[:, -1, :].float()
            nxt = last.argmax(dim=-1)
            tokens.append(nxt)
            logits.append(last)
            ids = nxt[:, None]
    return torch.stack(tokens, 1), torch.stack(logits, 1)


def tolerance_for(dtype: torch.dtype) -> float:
    """1e-4 in fp32 (issue 7); half precision rounds each op to ~3 significant digits."""
    return 1e-4 if dtype == torch.float32 else 5e-2


def compare(tokens: torch.Tensor, logits: torch.Tensor, ref_tokens: torch.Tensor, ref_logits: torch.Tensor,
            tolerance: float) -> Check:
    mismatches = int((tokens != ref_tokens).sum())
    diff = float((logits - ref_logits).abs().max()) if logits is not None else float("inf")
    return Check(mismatches == 0, diff, tolerance, mismatches)
