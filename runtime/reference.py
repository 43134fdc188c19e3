"""The monolithic reference: the same transformers model, same weights, greedy decoding in one process."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime.errors import SpecError
from runtime.parts import build_full
from runtime.spec import RunSpec, prompts_of


@dataclass(frozen=True)
class Check:
    """The run against the reference: token agreement and the largest logit difference."""

    tokens_match: bool
    max_abs_diff: float
    tolerance: float
    mismatches: int  # (prompt, step) pairs whose token differs from the reference's beyond a near-tie
    near_ties: int = 0  # pairs whose token differs, but by less than the tolerance in the reference's logits

    @property
    def ok(self) -> bool:
        return self.tokens_match and self.max_abs_diff <= self.tolerance


def reference_device(spec: RunSpec) -> str:
    """Where the reference must run to hold the run's weights.

    Seeded weights are drawn by the generator of the device the model is built on: the CPU's and
    CUDA's give different numbers for one seed. An NCCL run's ranks draw theirs on their GPUs, so its
    reference is built on a GPU too (identical draws on every GPU); a checkpoint is the same anywhere.
    """
    if spec.backend != "nccl" or spec.weights:
        return "cpu"
    if not torch.cuda.is_available():
        raise SpecError("the seeded weights of an nccl run are drawn on the GPU, and this host has none to "
                        "rebuild them: check on a GPU host, or run with --weights (a checkpoint checks anywhere)")
    return "cuda:0"


def greedy(spec: RunSpec, forced: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """Tokens [N, T], last-position logits [N, T, V] (fp32) and the weights' dtype, from the monolithic model.

    forced [N, T]: feed these tokens instead of the reference's own picks (teacher forcing), so every
    step's logits are compared at the run's prefix even after a bf16 near-tie sent the two apart."""
    from transformers import DynamicCache

    device = reference_device(spec)
    _, model = build_full(spec, device)
    dtype = next(model.parameters()).dtype
    ids = prompts_of(spec, model.config.vocab_size).to(device)
    cache = DynamicCache(config=model.config)
    tokens, logits = [], []
    with torch.no_grad():
        for step in range(spec.new_tokens):
            out = model(input_ids=ids, past_key_values=cache, use_cache=True)
            last = out.logits[:, -1, :].float()
            nxt = last.argmax(dim=-1)
            tokens.append(nxt)
            logits.append(last)
            ids = (nxt if forced is None else forced[:, step].to(device))[:, None]
    return torch.stack(tokens, 1).cpu(), torch.stack(logits, 1).cpu(), dtype


def tolerance_for(dtype: torch.dtype, scale: float = 0.0) -> float:
    """1e-4 in fp32. Half precision rounds each op to ~3 significant digits and the error grows with
    depth and with the logits' size: 5e-2, or 4% of the largest reference logit when that is more.

    Why 4%: two stock transformers implementations of the same bf16 model part by about half that. On one
    H200, Qwen3-30B-A3B (48 layers) with eager and with SDPA attention, teacher-forced on the same 32 x
    160 tokens, differ by up to 0.109 in logits whose largest is 4.72 (2.3%; bench/bf16_noise.py); the
    runtime's fast paths differ from the eager reference by the same 0.109. The
    bound sits at about twice that floor, so it still catches a wrong expert, mask or weight, which moves
    logits by their own size."""
    return 1e-4 if dtype == torch.float32 else max(5e-2, 0.04 * scale)


def check(spec: RunSpec, tokens: torch.Tensor, logits: torch.Tensor) -> Check:
    """Run the reference on the run's tokens (teacher forcing) and compare: every token the reference's
    pick or within the tolerance of it (a near-tie), logits within the dtype's tolerance."""
    forced = tokens if bool((tokens >= 0).all()) else None
    ref_tokens, ref_logits, dtype = greedy(spec, forced)
    return compare(tokens, logits, ref_tokens, ref_logits, tolerance_for(dtype, float(ref_logits.abs().max())))


def compare(tokens: torch.Tensor, logits: torch.Tensor, ref_tokens: torch.Tensor, ref_logits: torch.Tensor,
            tolerance: float) -> Check:
    differ = tokens != ref_tokens
    # a near-tie: the run's token scores within the tolerance of the reference's best at that step
    picked = ref_logits.gather(-1, tokens.clamp(min=0)[..., None]).squeeze(-1)
    tie = differ & (tokens >= 0) & (picked >= ref_logits.max(-1).values - tolerance)
    mismatches = int((differ & ~tie).sum())
    diff = float((logits - ref_logits).abs().max()) if logits is not None else float("inf")
    return Check(mismatches == 0, diff, tolerance, mismatches, int(tie.sum()))
