"""Typed node metadata: every `node.meta` key podplan uses is declared here, once.

Passes read and write metadata only through these accessors, so a missing key fails with
a message that names the node and the pass to run first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.fx as fx

from costmodels.errors import PodplanError

ROLE = "podplan.role"  # str, one of planner.roles.ROLES
LAYER = "podplan.layer"  # int | None (None outside decoder layers)
MODULE = "podplan.module"  # str: qualified name of the innermost module the node belongs to
COST = "podplan.cost"  # NodeCost
STAGE = "podplan.stage"  # str: stage kind assigned by classification


class MetadataError(PodplanError):
    """A pass found a node without the metadata it needs."""


@dataclass(frozen=True)
class NodeCost:
    """What one node costs, for the traced (batch, seq) signature.

    params, weight_bytes: parameters the node owns (a leaf module's, else 0).
    flops_per_token: floating-point operations per token (multiply-add = 2).
    act_bytes_per_token: activation bytes read + written per token.
    out_shapes: output tensor shapes from shape propagation.
    out_dtype: dtype of the (first) output tensor.
    """

    params: int
    weight_bytes: int
    flops_per_token: float
    act_bytes_per_token: float
    out_shapes: tuple[tuple[int, ...], ...]
    out_dtype: str


def _get(node: fx.Node, key: str, provider: str) -> Any:
    try:
        return node.meta[key]
    except KeyError:
        raise MetadataError(f"node '{node.name}' has no '{key}'; run {provider} first") from None


def role_of(node: fx.Node) -> str:
    return _get(node, ROLE, "the frontend trace")


def layer_of(node: fx.Node) -> int | None:
    return _get(node, LAYER, "the frontend trace")


def module_of(node: fx.Node) -> str:
    return _get(node, MODULE, "the frontend trace")


def cost_of(node: fx.Node) -> NodeCost:
    return _get(node, COST, "the 'annotate' pass")


def stage_of(node: fx.Node) -> str:
    return _get(node, STAGE, "the 'classify' pass")


def has(node: fx.Node, key: str) -> bool:
    return key in node.meta
