"""Time the stage-split pass pipeline on full-size models (meta device) and report peak RSS.

    .venv/bin/python bench/stage_split.py                 # deepseek-v3
    .venv/bin/python bench/stage_split.py qwen3-235b-a22b mixtral-8x22b

Each model runs in a fresh process, so the peak RSS is that model's alone.
"""

from __future__ import annotations

import json
import subprocess
import sys

_CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
from planner.frontend.trace import trace
from planner.frontend.shape import shape_from_traced
from planner.frontend.stages import compile_stages, stage_counts
t1 = time.perf_counter()
traced = trace(sys.argv[1])
shape = shape_from_traced(traced)
t2 = time.perf_counter()
program = compile_stages(traced, shape, batch=1, seq=128)
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "trace_s": t2 - t1, "passes_s": t3 - t2,
                  "per_pass": {r.name: r.seconds for r in program.records}, "stages": stage_counts(program),
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> int:
    models = sys.argv[1:] or ["deepseek-v3"]
    print(f"{'model':<18} {'import s':>8} {'trace s':>8} {'passes s':>9} {'peak RSS MiB':>13}  stages")
    for model in models:
        proc = subprocess.run([sys.executable, "-c", _CHILD, model], capture_output=True, text=True, check=True)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        stages = ", ".join(f"{n} {k}" for k, n in r["stages"].items())
        print(f"{model:<18} {r['import_s']:>8.1f} {r['trace_s']:>8.1f} {r['passes_s']:>9.1f} {r['peak_rss_mib']:>13.0f}  {stages}")
        print("    " + ", ".join(f"{k} {v:.2f}" for k, v in r["per_pass"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
