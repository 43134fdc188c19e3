"""`podplan --version`, `--help`, `models`, `show` and `diff` answer without loading torch, transformers or
ortools (seconds of imports); the defaults --help restates match the modules that own them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "plans" / "deepseek-v3.cloudmatrix384.json"
HEAVY = ("torch", "transformers", "ortools")

# Runs a command in-process through main() and prints which heavy modules it loaded, as JSON on stderr's
# last line (stdout is the command's own).
_PROBE = """
import json, sys
from planner.cli.main import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)), file=sys.stderr)
sys.exit(code)
"""


def _loaded(*argv: str) -> list[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", _PROBE.format(heavy=HEAVY), *argv], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)
    assert proc.returncode in (0, 1), proc.stderr
    return json.loads(proc.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [
    ["--version"],
    ["--help"],
    ["compile", "--help"],
    ["models"],
    ["show", str(GOLDEN)],
    ["show", str(GOLDEN), "--format", "html", "-o", os.devnull],
    ["diff", str(GOLDEN), str(GOLDEN)],
], ids=lambda a: " ".join(Path(x).name for x in a))
def test_light_commands_do_not_import_torch_transformers_or_ortools(argv):
    assert _loaded(*argv) == []


def test_help_defaults_are_the_library_defaults():
    from planner.balance import balancer, loads
    from planner.cli import defaults
    from planner.compile import DEFAULT_WORKLOAD, CompileOptions
    from planner.replan import DEFAULT_SLACK

    opts = CompileOptions()
    assert defaults.COMPILE_WORKLOAD == DEFAULT_WORKLOAD == opts.workload
    assert (defaults.COMPILE_LOADS, defaults.COMPILE_TIME_LIMIT, defaults.COMPILE_SEED, defaults.COMPILE_SPLIT) == (
        opts.loads, opts.time_limit, opts.seed, opts.split)
    from planner.search import SEARCH_MODES

    assert (defaults.COMPILE_MODES, defaults.COMPILE_MODE) == (SEARCH_MODES, opts.mode)
    assert defaults.BALANCE_ALGORITHMS == balancer.ALGORITHMS
    assert defaults.BALANCE_SPLITS == balancer.SPLITS
    assert defaults.BALANCE_TIME_LIMIT == balancer.DEFAULT_TIME_LIMIT
    assert defaults.BALANCE_MIGRATION_SLACK == balancer.DEFAULT_MIGRATION_SLACK
    assert defaults.LOAD_GENERATORS == loads.GENERATORS
    assert defaults.REPLAN_SLACK == DEFAULT_SLACK


@pytest.mark.slow
def test_stored_model_table_is_a_fresh_count():
    """models.json is what counting the transformers classes gives now (else: python -m planner.cli.models --write)."""
    from planner.cli.models import TABLE, table_document

    stored = (ROOT / "planner" / "cli" / TABLE).read_text()
    assert stored == table_document(), "planner/cli/models.json is stale: run `python -m planner.cli.models --write`"
