"""The split pass gives the same staged program on a torch without split_module's tuple_return (the
CUDA images of GPU hosts may carry one): one-output stages are made to return tuples afterwards."""

from __future__ import annotations

import re

import pytest
import torch

from passes import split as split_pass
from passes.manager import format_graph
from planner.frontend.stages import compile_stages, run_staged
from tests.passes.conftest import TINY, traced


@pytest.mark.parametrize("name", TINY)
def test_split_without_tuple_return_is_the_same_program(name, monkeypatch):
    t, shape = traced(name, "cpu", 0)
    native = compile_stages(t, shape, 2, 5)
    monkeypatch.setattr(split_pass, "_HAS_TUPLE_RETURN", False)
    emulated = compile_stages(t, shape, 2, 5)
    # the same program; only the numbering of the top-level getitem nodes follows creation order
    def text(gm) -> str:
        return re.sub(r"getitem(_\d+)?\b", "getitem", format_graph(gm))

    assert text(emulated.gm) == text(native.gm)
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    assert torch.equal(run_staged(emulated, ids), run_staged(native, ids))
