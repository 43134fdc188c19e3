"""The frontend's error: a model podplan cannot load (unknown name, bad config.json, unsupported architecture)."""

from __future__ import annotations

from costmodels.errors import PodplanError


class ConfigError(PodplanError):
    """A model name, config.json or architecture podplan cannot use."""
