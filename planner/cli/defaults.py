"""Defaults that `podplan --help` shows, restated here so that building the parser imports no solver,
torch or transformers: the modules that own them load in seconds, help must not.

tests/planner/test_cli_startup.py checks each value against the module that owns it.
"""

from __future__ import annotations

from planner.ir.plan import Workload

# planner.compile: DEFAULT_WORKLOAD and CompileOptions' fields
COMPILE_WORKLOAD = Workload(input_len=4096, output_len=1024, quant="int8", tpot_slo_ms=50.0)
COMPILE_LOADS = "uniform"
COMPILE_TIME_LIMIT = 0.5
COMPILE_SEED = 0
COMPILE_SPLIT = "equal"
COMPILE_MODES = ("auto", "agg", "disagg")  # planner.search.SEARCH_MODES
COMPILE_MODE = "auto"

# planner.balance.balancer
BALANCE_ALGORITHMS = ("ilp", "eplb")
BALANCE_SPLITS = ("equal", "weighted")
BALANCE_TIME_LIMIT = 1.0
BALANCE_MIGRATION_SLACK = 0.01

# planner.balance.loads
LOAD_GENERATORS = ("uniform", "zipf:S", "hot:K")

# planner.replan
REPLAN_SLACK = 0.015
