"""The NCCL path: a tiny model on one GPU, and with attention and experts on different GPUs (each skips
without the GPUs it needs)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from runtime.launch import launch
from runtime.reference import check
from tests.runtime.conftest import colocated, disaggregated

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_nccl_disaggregated_matches_the_reference():
    spec = dataclasses.replace(disaggregated("tiny-qwen3-moe", 1, 1, microbatches=2, prompts=4, prompt_len=5,
                                             new_tokens=3), backend="nccl")
    out = launch(spec, timeout_s=300)
    result = check(spec, out.tokens, out.logits)  # the reference runs on GPU 0: seeded weights are drawn there
    assert result.tokens_match and result.max_abs_diff <= 1e-3, result


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nccl_on_one_gpu_matches_the_reference_built_on_the_gpu():
    """The NCCL path on a 1-GPU host: attention and experts colocated, two microbatches, shared expert."""
    spec = dataclasses.replace(colocated("tiny-deepseek-v3", 1, microbatches=2, prompts=4, prompt_len=5,
                                         new_tokens=3), backend="nccl")
    out = launch(spec, timeout_s=300)
    result = check(spec, out.tokens, out.logits)
    assert result.tokens_match and result.max_abs_diff <= 1e-4, result
