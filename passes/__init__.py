"""FX graph passes over the traced model and the pass manager that runs them.

The registry below is the one list of passes: name -> entry function, with the metadata each
pass needs and provides. Pipelines are named lists of passes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch.fx as fx

from costmodels.errors import InputError
from passes import annotate, classify, cut_analysis, expert_decompose, kv_cache, microbatch, phases, split
from passes.context import PassContext


@dataclass(frozen=True)
class PassInfo:
    """A registered pass: its entry function and the metadata keys it needs and provides."""

    name: str
    run: Callable[[fx.GraphModule, PassContext], fx.GraphModule]
    needs: tuple[str, ...]
    provides: tuple[str, ...]
    doc: str


def _info(module: ModuleType, entry: Callable) -> PassInfo:
    doc = (entry.__doc__ or "").strip().splitlines()[0]
    return PassInfo(module.NAME, entry, tuple(module.NEEDS), tuple(module.PROVIDES), doc)


PASSES: dict[str, PassInfo] = {
    p.name: p
    for p in (
        _info(kv_cache, kv_cache.kv_cache),
        _info(annotate, annotate.annotate),
        _info(classify, classify.classify),
        _info(split, split.split),
        _info(cut_analysis, cut_analysis.cut_analysis),
        _info(expert_decompose, expert_decompose.expert_decompose),
        _info(phases, phases.phases),
        _info(microbatch, microbatch.microbatch),
    )
}

PIPELINES: dict[str, tuple[str, ...]] = {
    "annotate": ("annotate",),
    "stage-split": (
        "kv-cache", "annotate", "classify", "split", "cut-analysis", "expert-decompose", "phases", "microbatch",
    ),
}


def get_pass(name: str) -> PassInfo:
    try:
        return PASSES[name]
    except KeyError:
        raise InputError(f"unknown pass '{name}'; known: {', '.join(PASSES)}") from None


def get_pipeline(name: str) -> tuple[str, ...]:
    try:
        return PIPELINES[name]
    except KeyError:
        raise InputError(f"unknown pipeline '{name}'; known: {', '.join(PIPELINES)}") from None
