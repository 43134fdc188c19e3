"""The error of the Plan IR: a plan file that is missing, corrupt or breaks a plan rule."""

from __future__ import annotations

from costmodels.errors import PodplanError


class PlanError(PodplanError):
    """A plan file that is missing, corrupt or fails validation (the message names the JSON path)."""
