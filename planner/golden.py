"""Golden plans: the bundled models compiled for the reference topologies, kept in `plans/`.

`python -m planner.golden --write` (what `make plans`) runs regenerates them; the test suite
recompiles each and requires byte-identical output, so any change to a plan is deliberate and
shows up in review as a diff (`podplan diff plans/X.json NEW.json`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from planner.compile import CompileOptions, compile_plan
from planner.ir.plan import Workload, write_plan
from planner.search import Pins
from planner.ir.fileio import write_atomic
from planner.ir.plan import BUNDLED_FACTS_FILE

PLANS_DIR = Path(__file__).resolve().parents[1] / "plans"


@dataclass(frozen=True)
class Golden:
    file: str
    model: str
    topology: str
    options: CompileOptions

    def compile_text(self) -> str:
        return compile_plan(self.model, self.topology, self.options).to_json()


GOLDEN = (
    # CloudMatrix-Infer's setting: DeepSeek-V3/R1 INT8, MTP 70%, SLO 50 ms, skewed expert loads. Pinned to
    # disaggregated 40-device prefill + 88-device decode instances with attention DP (no head-TP), the layout
    # the export and replan tests are written against; unpinned, `podplan compile` shows the search's choice
    Golden("deepseek-v3.cloudmatrix384.json", "deepseek-v3", "cloudmatrix384",
           CompileOptions(Workload(4096, 1024, tpot_slo_ms=50.0, mtp_accept=0.7, quant="int8"),
                          Pins(decode_devices=88, prefill_devices=40, attention_tp=1), loads="zipf:1.2",
                          mode="disagg")),
    # Kimi K2 (DeepSeek-V3's architecture, 384 experts) in the same setting
    Golden("kimi-k2.cloudmatrix384.json", "kimi-k2", "cloudmatrix384",
           CompileOptions(Workload(4096, 1024, tpot_slo_ms=50.0, mtp_accept=0.7, quant="int8"), loads="zipf:1.2")),
    Golden("qwen3-235b-a22b.cloudmatrix384.json", "qwen3-235b-a22b", "cloudmatrix384",
           CompileOptions(Workload(4096, 1024, tpot_slo_ms=50.0, quant="int8"), loads="zipf:1.2")),
    Golden("mixtral-8x22b.h100-cluster-2.json", "mixtral-8x22b", "h100-cluster:2",
           CompileOptions(Workload(2048, 512, tpot_slo_ms=46.0, quant="fp8"), loads="hot:2")),
    # runnable by `podplan run`: disaggregated MoE-attention decode + a prefill instance on 8 processes
    Golden("tiny-deepseek-v3.local-8.json", "tiny-deepseek-v3", "local:8",
           CompileOptions(Workload(16, 8, quant="bf16"), Pins(attention_devices=2, moe_devices=4, prefill_devices=2),
                          loads="zipf:1.2")),
)


def bundled_facts() -> dict[str, dict]:
    """Bundled name -> the ModelInfo fields any plan of it must hold (expert_bytes via params_expert).

    The IR may not import the frontend (tests/test_layering.py), so the plan loader reads these as
    data from planner/ir/bundled_models.json, which `--write` regenerates with the golden plans.
    """
    from planner.frontend.shape import shape_of
    from planner.frontend.zoo import bundled_names, load_source

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m planner.golden", description=__doc__)
    parser.add_argument("--write", action="store_true", help="regenerate plans/ (default: check only)")
    parser.add_argument("names", nargs="*", help="golden files to handle (default: all)")
    args = parser.parse_args(argv)
    stale = 0
    if not args.names:  # the bundled models' facts the plan loader checks (planner/ir/bundled_models.json)
        if args.write:
            write_atomic(BUNDLED_FACTS_FILE, facts_text())
            print(f"wrote {BUNDLED_FACTS_FILE}")
        else:
            same = BUNDLED_FACTS_FILE.read_text() == facts_text()
            stale += not same
            print(f"{'ok   ' if same else 'STALE'} {BUNDLED_FACTS_FILE}")
    for g in GOLDEN:
        if args.names and g.file not in args.names:
            continue
        path = PLANS_DIR / g.file
        if args.write:
            write_plan(compile_plan(g.model, g.topology, g.options), path)
            print(f"wrote {path}")
            continue
        same = path.is_file() and path.read_text() == g.compile_text()
        stale += not same
        print(f"{'ok   ' if same else 'STALE'} {path}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
