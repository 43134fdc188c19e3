"""The NCCL path: a tiny model with attention and experts on different GPUs (skips without 2 CUDA GPUs)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from runtime.launch import launch
from runtime.reference import check
from tests.runtime.conftest import disaggregated

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")]


def test_nccl_disaggregated_matches_the_cpu_reference():
    spec = dataclasses.replace(disaggregated("tiny-qwen3-moe", 1, 1, microbatches=2, prompts=4, prompt_len=5,
                                             new_tokens=3), backend="nccl")
    out = launch(spec, timeout_s=300)
    result = check(spec, out.tokens, out.logits)  # the reference runs on the CPU
    assert result.tokens_match and result.max_abs_diff <= 1e-3, result
