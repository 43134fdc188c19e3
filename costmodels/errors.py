"""The one error hierarchy of podplan.

It lives in the leaf package so that every layer (costmodels, passes, planner,
runtime) can raise it; the CLI turns any `PodplanError` into one line on stderr
and exit code 2. Messages are subject first: what failed, the broken rule, the fix.
"""


class PodplanError(Exception):
    """A user-facing error: bad input, an impossible request, a corrupt file."""


class ConfigError(PodplanError):
    """A model name, config.json or architecture podplan cannot use."""


class TopologyError(PodplanError):
    """An unknown topology name or bad topology parameters."""


class InputError(PodplanError):
    """A bad flag value, loads file or other command-line input."""


class InfeasibleError(PodplanError):
    """A request that cannot be met (memory budget, slot counts, SLOs)."""


class PlanError(PodplanError):
    """A plan file that is missing, corrupt or fails validation."""
