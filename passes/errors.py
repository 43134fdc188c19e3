"""The errors of the passes: a pass run out of order or failing, a broken graph, a model it cannot stage."""

from __future__ import annotations

from costmodels.errors import PodplanError


class PassError(PodplanError):
    """A pass failed, was run out of order, or left the graph invalid."""


class LintError(PassError):
    """The graph breaks an invariant (torch's lint or podplan's)."""


class MetadataError(PassError):
    """A pass found a node without the metadata it needs."""


class UnsupportedModelError(PassError):
    """The traced model uses a construct a pass cannot stage (the message names it and the family)."""
