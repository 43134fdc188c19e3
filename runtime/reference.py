"""The monolithic reference: the same transformers model, same weights, greedy decoding in one process."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from runtime.errors import SpecError
from runtime.parts import build_full
from runtime.spec import RunSpec, prompts_of

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class Check:
    """The run against the reference: token agreement and the largest logit difference."""

    tokens_match: bool
    max_abs_diff: float
    tolerance: float
    mismatches: int  # (prompt, step) pairs whose token differs from the reference's beyond a near-tie
    near_ties: int = 0  # pairs whose token differs, but by less than the tolerance in the reference's logits
    # half precision: pairs where two stock transformers implementations (eager and SDPA attention) of
    # the same weights part from each other beyond the tolerance (logits or token)
    noisy: int = 0
    outside: int = 0  # pairs where the run parts from the reference beyond the tolerance (logits or token)
    pairs: int = 0  # (prompt, step) pairs compared

    @property
    def inconclusive(self) -> bool:
        """More than a quarter of the pairs part in transformers' own two implementations: the model's
        seeded bf16 weights are chaotic, and no comparison of outputs can tell a fault from rounding."""
        return self.noisy * 4 > self.pairs

    @property
    def ok(self) -> bool:
        """The run parts from the reference at no more pairs than twice the stock pair parts from itself
        (none at all in fp32, or where the model has one attention implementation only)."""
        return self.outside <= 2 * self.noisy and not self.inconclusive


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
    device = reference_device(spec)
    _, model = build_full(spec, device)
    tokens, logits = _decode(model, spec, forced, device)
    return tokens, logits, next(model.parameters()).dtype


def _decode(model: PreTrainedModel, spec: RunSpec, forced: torch.Tensor | None, device: str
            ) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import DynamicCache

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
    return torch.stack(tokens, 1).cpu(), torch.stack(logits, 1).cpu()


def _stock_pair(model: PreTrainedModel) -> str | None:
    """The other stock attention implementation of `model` (eager <-> SDPA), or None where it has one only."""
    if not getattr(type(model), "_supports_sdpa", False):
        return None
    return "sdpa" if model.config._attn_implementation == "eager" else "eager"


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
    pick or within the tolerance of it (a near-tie), logits within the dtype's tolerance.

    In half precision the reference runs twice, with eager and with SDPA attention (both stock
    transformers), and the run may part from the reference beyond the tolerance at up to twice as many
    (prompt, step) pairs as those two part from each other. Why: where a bf16 rounding flips a routing
    decision, that position's logits move by their own size, in transformers' own implementations too, and
    which near-tied routes flip depends on the rounding, so the positions differ from pair to pair while
    their number does not. On one H200, a 2-layer Mixtral-8x7B of seeded weights (32 x 144 tokens): eager
    vs SDPA part at 55 of 512 pairs, podplan's fast paths at 1 (by 6.2 in logits up to ~7); Qwen3-30B-A3B
    (48 layers): at none. A wrong expert, mask or weight moves every position. Where the stock pair parts at
    more than a quarter of the pairs (4 layers of Mixtral-8x7B: 46 of 64; all 32: every pair), the check is
    inconclusive and says so: it never passes a run it cannot judge."""
    forced = tokens if bool((tokens >= 0).all()) else None
    device = reference_device(spec)
    _, model = build_full(spec, device)
    dtype = next(model.parameters()).dtype
    ref_tokens, ref_logits = _decode(model, spec, forced, device)
    stock = None
    other = _stock_pair(model) if dtype != torch.float32 else None
    if other is not None:
        model.config._attn_implementation = other
        stock = _decode(model, spec, forced if forced is not None else ref_tokens, device)[1]
    del model
    return compare(tokens, logits, ref_tokens, ref_logits, tolerance_for(dtype, float(ref_logits.abs().max())),
                   stock)


def compare(tokens: torch.Tensor, logits: torch.Tensor | None, ref_tokens: torch.Tensor, ref_logits: torch.Tensor,
            tolerance: float, stock_logits: torch.Tensor | None = None) -> Check:
    """The run's tokens and logits [N, T(, V)] against the reference's; `stock_logits`: a second stock
    implementation's (teacher-forced on the same tokens), whose own partings set the allowance."""
    differ = tokens != ref_tokens
    # a near-tie: the run's token scores within the tolerance of the reference's best at that step
    picked = ref_logits.gather(-1, tokens.clamp(min=0)[..., None]).squeeze(-1)
    tie = differ & (tokens >= 0) & (picked >= ref_logits.max(-1).values - tolerance)
    mismatched = differ & ~tie
    noisy = 0
    if stock_logits is not None:
        stock_tokens = stock_logits.argmax(-1)
        stock_picked = ref_logits.gather(-1, stock_tokens[..., None]).squeeze(-1)
        stock_off = (stock_tokens != ref_tokens) & (stock_picked < ref_logits.max(-1).values - tolerance)
        noisy = int(((stock_logits - ref_logits).abs().amax(-1) > tolerance).logical_or(stock_off).sum())
    pairs = int(ref_tokens.numel())
    mismatches = int(mismatched.sum())
    if logits is None:
        return Check(mismatches == 0, float("inf"), tolerance, mismatches, int(tie.sum()), noisy, pairs, pairs)
    per = (logits - ref_logits).abs().amax(-1)
    return Check(mismatches == 0, float(per.max()), tolerance, mismatches, int(tie.sum()), noisy,
                 int(((per > tolerance) | mismatched).sum()), pairs)
