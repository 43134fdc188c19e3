"""Fixtures for the cost-model tests: the hand-built shapes of `shapes.py`."""

from __future__ import annotations

import pytest

from costmodels.model_shape import ModelShape
from tests.costmodels.shapes import DSV3, GQA


@pytest.fixture(scope="session")
def dsv3() -> ModelShape:
    return DSV3


@pytest.fixture(scope="session")
def gqa() -> ModelShape:
    return GQA
