"""Frontend (model zoo, tracing), solvers, deployment search, the Plan IR and the CLI."""

__version__ = "0.1.0"
