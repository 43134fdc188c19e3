"""Shared fixtures: tiny models traced once per session (on meta and with seeded CPU weights)."""

from __future__ import annotations

import functools

import pytest

from planner.frontend.trace import trace
from planner.frontend.shape import shape_from_traced
from planner.frontend.stages import compile_stages

TINY = ["tiny-deepseek-v3", "tiny-qwen3-moe", "tiny-mixtral", "tiny-olmoe"]


@functools.lru_cache(maxsize=None)
def traced(name: str, device: str = "meta", seed: int = 0):
    """(Traced, ModelShape), cached: tracing is the slow part and passes never mutate it."""
    t = trace(name, device=device, seed=seed)
    return t, shape_from_traced(t)


@functools.lru_cache(maxsize=None)
def staged(name: str, device: str = "meta", seed: int = 0, batch: int = 2, seq: int = 5):
    t, shape = traced(name, device, seed)
    return compile_stages(t, shape, batch, seq)


@pytest.fixture(scope="session")
def tiny_dsv3():
    return staged("tiny-deepseek-v3")
