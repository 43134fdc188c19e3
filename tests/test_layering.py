"""The import arrows of DESIGN.md: costmodels <- passes <- planner -> runtime, nobody imports the CLI."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STDLIB = set(sys.stdlib_module_names)

# package -> top-level modules it may import (besides the stdlib and itself)
ALLOWED = {
    "costmodels": {"numpy", "networkx"},
    "passes": {"costmodels", "torch", "numpy", "networkx"},
    "planner": {"costmodels", "passes", "torch", "transformers", "numpy", "networkx", "ortools", "jinja2", "rich",
                "safetensors"},
    "runtime": {"torch", "numpy", "safetensors", "rich", "transformers"},
}
# runtime reads only the Plan IR and the model loader
RUNTIME_PLANNER = {"planner", "planner.plan", "planner.zoo", "planner.frontend", "planner.roles", "planner.fileio"}
# the CLI commands are the one place where planner meets runtime
CLI_MAY_IMPORT_RUNTIME = {"planner/commands/run.py", "planner/cli.py"}


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append(node.module)
    return out


def test_import_arrows_point_down():
    problems = []
    for pkg, allowed in ALLOWED.items():
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for mod in _imports(path):
                top = mod.split(".")[0]
                if top in STDLIB or top == pkg or top == "__future__":
                    continue
                if mod == "planner.cli" and rel != "planner/__main__.py":
                    problems.append(f"{rel} imports the CLI ({mod})")
                if pkg == "runtime" and top == "planner":
                    if mod not in RUNTIME_PLANNER:
                        problems.append(f"{rel} imports {mod}: runtime may only read the Plan IR and the model loader")
                    continue
                if pkg == "planner" and top == "runtime" and rel in CLI_MAY_IMPORT_RUNTIME:
                    continue
                if top not in allowed:
                    problems.append(f"{rel} imports {mod}: {pkg} may import only {sorted(allowed)}")
    assert not problems, "\n".join(problems)
