"""The root of podplan's one error hierarchy, and the errors the cost models raise themselves.

`PodplanError` lives here, in the leaf package, because every layer (costmodels, passes,
planner, runtime) subclasses it and imports only point down; the CLI turns any `PodplanError`
into one line on stderr and exit code 2. Each other error lives with the concept it names:
`PlanError` in planner.ir, `ConfigError` in planner.frontend, `PassError` and its kin in
passes.errors, the runtime's in runtime.errors. Messages are subject first: what failed,
the broken rule, the fix.
"""


class PodplanError(Exception):
    """A user-facing error: bad input, an impossible request, a corrupt file."""


class InputError(PodplanError):
    """A bad value given to podplan: a flag, a loads file, a cost-model argument (--ep, --quant, ...).

    The cost models check the values they are handed, so the error for any bad user-supplied
    value is this one, defined next to the root and raised by every layer.
    """


class TopologyError(PodplanError):
    """An unknown topology name or bad topology parameters."""


class InfeasibleError(PodplanError):
    """A request that cannot be met (memory budget, slot counts, SLOs)."""
