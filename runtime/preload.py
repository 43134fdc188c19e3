"""Imported once by the launcher's forkserver: torch, transformers and the bundled model families.

Workers forked from the server start with these modules loaded. Nothing here starts threads
or touches torch.distributed (forking a process with live threads is unsafe).
"""

from __future__ import annotations

import warnings

import torch  # noqa: F401 - the point is the import
import torch.distributed  # noqa: F401

import runtime.worker  # noqa: F401
from planner.frontend import zoo
from planner.frontend.trace import build_config


def _import_families() -> None:
    """Import the modeling module of every bundled family (transformers loads them lazily, ~1 s each)."""
    from transformers import AutoModelForCausalLM

    for name in zoo.bundled_names():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config = build_config(zoo.load_source(name))
                AutoModelForCausalLM._model_mapping[type(config)]
        except Exception:  # noqa: BLE001 - a preload miss only costs start-up time
            continue


_import_families()
