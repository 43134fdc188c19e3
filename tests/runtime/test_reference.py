"""The check's rule: the dtype's tolerance; in half precision, as many partings as twice those of two
stock implementations of the same weights; inconclusive where those part at most positions."""

from __future__ import annotations

import torch

from runtime.reference import compare

N, T, V = 4, 4, 5


def _ref() -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.zeros(N, T, V)
    logits[..., 0] = 4.0  # every step's pick is token 0, by a clear margin
    return torch.zeros(N, T, dtype=torch.long), logits


def test_equal_runs_pass_and_a_shift_beyond_the_tolerance_fails():
    tokens, ref = _ref()
    assert compare(tokens, ref.clone(), tokens, ref, 0.05).ok
    bad = ref.clone()
    bad[1, 2, 3] += 0.2
    result = compare(tokens, bad, tokens, ref, 0.05)
    assert not result.ok and result.outside == 1 and result.tokens_match


def test_partings_are_allowed_up_to_twice_the_stock_pairs_own():
    tokens, ref = _ref()
    stock = ref.clone()
    stock[0, 1, 2] += 3.0  # the stock pair parts at one pair: a rounding-flipped route
    run = ref.clone()
    run[2, 3, 2] += 3.0  # the run parts elsewhere: which routes flip depends on the rounding
    run[3, 0, 4] += 3.0
    ok = compare(tokens, run, tokens, ref, 0.05, stock)
    assert ok.ok and ok.noisy == 1 and ok.outside == 2 and ok.max_abs_diff == 3.0
    run[1, 1, 1] += 3.0  # a third parting: more than rounding explains
    assert not compare(tokens, run, tokens, ref, 0.05, stock).ok


def test_a_different_token_beyond_a_near_tie_is_a_parting():
    tokens, ref = _ref()
    run_tokens = tokens.clone()
    run_tokens[0, 0] = 1
    run_tokens[1, 1] = 2
    ref2 = ref.clone()
    ref2[0, 0, 1] = 3.99  # token 1 at (0, 0) is within the tolerance of the best: a near-tie
    result = compare(run_tokens, ref2.clone(), tokens, ref2, 0.05)
    assert result.near_ties == 1 and result.mismatches == 1 and result.outside == 1 and not result.ok


def test_a_reference_that_parts_from_itself_at_most_positions_is_inconclusive_not_a_pass():
    tokens, ref = _ref()
    stock = ref.clone()
    stock[..., 3] += 3.0  # the stock pair parts everywhere: chaotic seeded weights
    result = compare(tokens, ref.clone(), tokens, ref, 0.05, stock)
    assert result.tokens_match and result.outside == 0 and result.inconclusive and not result.ok


def test_missing_logits_never_pass():
    tokens, ref = _ref()
    assert not compare(tokens, None, tokens, ref, 0.05).ok
