"""Wall time and peak RSS of whole-model planning: `podplan compile` for the golden settings.

    .venv/bin/python bench/compile.py                 # every golden plan
    .venv/bin/python bench/compile.py deepseek-v3     # only those of one model

Each compile runs in a fresh process (so RSS is that compile's own) and the table prints
wall seconds, peak RSS and the plan's headline numbers. Targets: full DeepSeek-V3 ->
cloudmatrix384 (prefill + decode) <= 60 s and <= 4 GiB RSS on 2 cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from planner.golden import GOLDEN  # noqa: E402

_CHILD = """
import json, resource, sys, time
from planner.golden import GOLDEN
g = [g for g in GOLDEN if g.file == sys.argv[1]][0]
from planner.compile import compile_plan
t0 = time.perf_counter()
plan = compile_plan(g.model, g.topology, g.options)
wall = time.perf_counter() - t0
print(json.dumps({"wall_s": wall, "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "decode_tpot_ms": plan.decode.predictions.tpot_ms,
                  "decode_tput": plan.decode.predictions.throughput_per_device,
                  "prefill_tput": plan.prefill.predictions.throughput_per_device}))
"""


def main() -> int:
    wanted = sys.argv[1:]
    rows = []
    for g in GOLDEN:
        if wanted and g.model not in wanted:
            continue
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _CHILD, g.file], capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            print(f"{g.file}: failed: {proc.stderr.strip().splitlines()[-1]}", file=sys.stderr)
            return 1
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["process_s"] = time.perf_counter() - t0
        rows.append((g, r))
    print(f"{'plan':42}{'compile s':>10}{'process s':>10}{'RSS GiB':>9}{'TPOT ms':>9}{'dec tok/s/dev':>14}{'pre tok/s/dev':>14}")
    for g, r in rows:
        print(f"{g.file:42}{r['wall_s']:>10.1f}{r['process_s']:>10.1f}{r['rss_gib']:>9.2f}{r['decode_tpot_ms']:>9.1f}"
              f"{r['decode_tput']:>14,.0f}{r['prefill_tput']:>14,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
