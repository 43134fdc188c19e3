"""The import arrows of docs/design.md: costmodels <- passes <- planner -> runtime, nobody imports the CLI.

Inside planner the wings are layered too: the IR and the frontend are the floor (the runtime may read
them and nothing else of planner), balance/views/export sit on the IR, and only the drivers
(compile, search, replan, run_predictions, golden) and the CLI see every wing.
"""

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
    # triton: the GPU experts kernels (runtime/moe_triton.py), imported only on a CUDA host; CUDA builds
    # of torch ship it, CPU builds (CI's) do not need it
    "runtime": {"torch", "numpy", "safetensors", "rich", "transformers", "triton"},
}
# runtime reads only the Plan IR and the model loader (the frontend wing)
RUNTIME_MAY_READ = ("planner.ir", "planner.frontend")
# planner wing -> the planner wings it may import (itself always); "planner" is the package root (__version__)
WINGS = {
    "ir": {"planner"},
    "frontend": {"planner"},
    "balance": {"planner", "ir"},
    "views": {"planner", "ir"},
    "export": {"planner", "ir", "frontend"},
    "simulate": {"planner", "ir", "frontend"},  # re-scores a plan's instances: the model shape from the frontend
}
# the CLI command that runs plans is where planner meets runtime; `podplan profile` also times the runtime's
# own experts kernel (runtime.moe_triton), the one `podplan run` executes
CLI_MAY_IMPORT_RUNTIME = {"planner/cli/run.py", "planner/cli/profile.py"}


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append(node.module)
    return out


def _modules(pkg: str) -> list[tuple[str, Path]]:
    return [(p.relative_to(ROOT).as_posix(), p) for p in sorted((ROOT / pkg).rglob("*.py"))]


def _wing(mod: str) -> str:
    """planner.views.text -> 'views'; planner.compile -> 'compile'; planner -> 'planner'."""
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "planner"


def test_import_arrows_point_down():
    problems = []
    for pkg, allowed in ALLOWED.items():
        for rel, path in _modules(pkg):
            for mod in _imports(path):
                top = mod.split(".")[0]
                if top in STDLIB or top == pkg or top == "__future__":
                    continue
                if pkg == "runtime" and top == "planner":
                    if not mod.startswith(RUNTIME_MAY_READ):
                        problems.append(f"{rel} imports {mod}: runtime may only read the Plan IR and the model loader")
                    continue
                if pkg == "planner" and top == "runtime" and rel in CLI_MAY_IMPORT_RUNTIME:
                    continue
                if top not in allowed:
                    problems.append(f"{rel} imports {mod}: {pkg} may import only {sorted(allowed)}")
    assert not problems, "\n".join(problems)


def test_nobody_imports_the_cli():
    problems = []
    for pkg in ALLOWED:
        for rel, path in _modules(pkg):
            if rel.startswith("planner/cli/") or rel == "planner/__main__.py":
                continue
            problems += [f"{rel} imports the CLI ({m})" for m in _imports(path) if m.startswith("planner.cli")]
    assert not problems, "\n".join(problems)


def test_planner_wings_point_down():
    problems = []
    for rel, path in _modules("planner"):
        parts = rel.split("/")
        wing = parts[1] if len(parts) > 2 else None
        if wing not in WINGS:
            continue
        for mod in _imports(path):
            if mod.split(".")[0] != "planner" or _wing(mod) == wing:
                continue
            if _wing(mod) not in WINGS[wing]:
                problems.append(f"{rel} imports {mod}: planner/{wing} may import only {sorted(WINGS[wing])}")
    assert not problems, "\n".join(problems)


def test_planner_is_in_wings():
    """The flat layout stays gone: top-level planner modules are the drivers only."""
    top = sorted(p.name for p in (ROOT / "planner").glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "compile.py", "golden.py", "hetero.py", "placement.py", "replan.py",
                   "run_predictions.py", "search.py"]


def test_the_runtime_runs_the_host_topologies_the_cost_model_defines():
    """runtime.from_plan may not import costmodels: its list of runnable kinds must match by hand."""
    from costmodels.topology import HOST_GPU_KINDS
    from runtime.from_plan import RUNNABLE_KINDS

    assert RUNNABLE_KINDS == ("local", *HOST_GPU_KINDS)
