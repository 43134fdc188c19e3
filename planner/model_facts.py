"""The bundled models' facts that the plan loader checks plans against (planner/ir/bundled_models.json).

The IR may not import the frontend (tests/test_layering.py), so what a plan of a bundled model must
repeat (config digest, layers, experts, parameter counts) is kept as data beside the loader.
`python -m planner.model_facts --write` regenerates the file after a bundled config changes; a test
checks it is up to date.
"""

from __future__ import annotations

import json
import sys

from planner.frontend.shape import shape_of
from planner.frontend.zoo import bundled_names, load_source
from planner.ir.fileio import write_atomic
from planner.ir.plan import BUNDLED_FACTS_FILE


def bundled_facts() -> dict[str, dict]:
    """Bundled name -> the ModelInfo fields any plan of it must hold (expert_bytes via params_expert)."""
    out: dict[str, dict] = {}
    for name in bundled_names():
        shape = shape_of(name)
        out[name] = {
            "config_sha256": load_source(name).digest(), "attention": shape.attention,
            "num_layers": shape.num_layers, "moe_layers": list(shape.moe_layers), "hidden": shape.hidden,
            "vocab": shape.vocab, "num_routed_experts": shape.num_routed_experts,
            "num_shared_experts": shape.num_shared_experts, "top_k": shape.top_k,
            "params_total": shape.params_total, "params_active": shape.params_active,
            "params_expert": shape.params_expert,
        }
    return out


def facts_text() -> str:
    """One model a line, keys sorted: a changed config shows up as a one-line diff."""
    facts = bundled_facts()
    lines = [f" {json.dumps(name)}: {json.dumps(facts[name], sort_keys=True)}" for name in sorted(facts)]
    return "{\n" + ",\n".join(lines) + "\n}\n"


if __name__ == "__main__":  # python -m planner.model_facts --write
    if sys.argv[1:] == ["--write"]:
        write_atomic(BUNDLED_FACTS_FILE, facts_text())
        print(f"wrote {BUNDLED_FACTS_FILE}")
    else:
        sys.stdout.write(facts_text())
