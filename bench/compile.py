"""Wall time and peak RSS of whole-model planning: `podplan compile` with default options.

    .venv/bin/python bench/compile.py                          # every bundled model on the bench topologies
    .venv/bin/python bench/compile.py deepseek-v3              # only one model
    .venv/bin/python bench/compile.py --topology h100-cluster:2 deepseek-v3
    .venv/bin/python bench/compile.py --golden                 # the golden plans' settings instead

Each compile runs in a fresh process (so RSS is that compile's own) and the table prints wall
seconds, peak RSS, the mode the search chose and the plan's headline numbers. Target: every
compile <= 60 s and <= 4 GiB RSS on 2 cores; the exit status is 1 when one misses it or fails.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the last is heterogeneous: prefill and decode may be assigned to different hardware (planner/hetero.py)
TOPOLOGIES = ("cloudmatrix384", "cloudmatrix384:4", "h200-cluster:16", "h100-cluster:8+h200-cluster:8")
WALL_LIMIT_S = 60.0
RSS_LIMIT_GIB = 4.0

_CHILD = """
import json, resource, sys, time
from planner.compile import CompileOptions, compile_report
from planner.golden import GOLDEN
model, topology, golden = sys.argv[1], sys.argv[2], sys.argv[3]
opts = [g for g in GOLDEN if g.file == golden][0].options if golden else CompileOptions()
t0 = time.perf_counter()
if "+" in topology:  # a mixed topology: mode says which group got which phase ("P:h100/D:h200", "h200 only")
    from costmodels.topology import get_any_topology
    from planner.hetero import compile_mixed
    plan, res = compile_mixed(model, get_any_topology(topology), opts)
    win = res.chosen
    short = lambda g: g.split("-")[0]
    mode = f"P:{short(win.prefill)}/D:{short(win.decode)}" if win.split else f"{short(win.decode)} only"
    used, devices, req_s = win.devices_used, plan.topology.num_devices, win.requests_per_s
else:
    plan, sr = compile_report(model, topology, opts)
    mode, used, devices, req_s = sr.mode, sr.devices_used, sr.slice.devices, sr.requests_per_s
wall = time.perf_counter() - t0
dec = plan.decode.predictions
print(json.dumps({"wall_s": wall, "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "mode": mode, "used": used, "slice": devices,
                  "req_s": req_s, "tpot_ms": dec.tpot_ms, "decode_tput": dec.throughput_per_device,
                  "prefill_tput": plan.prefill.predictions.throughput_per_device if plan.prefill else None}))
"""


def _cases(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    if args.golden:
        from planner.golden import GOLDEN

        return [(g.model, g.topology, g.file) for g in GOLDEN if not args.models or g.model in args.models]
    from planner.frontend.zoo import bundled_names

    models = args.models or bundled_names()
    return [(m, t, "") for t in (args.topology or TOPOLOGIES) for m in models]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="bundled models (default: all)")
    parser.add_argument("--topology", action="append", help=f"topology (repeatable; default: {', '.join(TOPOLOGIES)})")
    parser.add_argument("--golden", action="store_true", help="the golden plans' settings (planner/golden.py)")
    args = parser.parse_args()
    print(f"{'model':18}{'topology':31}{'compile s':>10}{'process s':>10}{'RSS GiB':>9}  {'mode':12}{'used':>10}"
          f"{'req/s':>12}{'TPOT ms':>9}{'dec tok/s/dev':>14}{'pre tok/s/dev':>14}", flush=True)
    bad = 0
    for model, topology, golden in _cases(args):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _CHILD, model, topology, golden], capture_output=True, text=True,
                              cwd=ROOT)
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines() or ["(no output)"]
            print(f"{model:18}{topology:31}  FAILED: {lines[-1]}", flush=True)
            bad += 1
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        process_s = time.perf_counter() - t0
        over = r["wall_s"] > WALL_LIMIT_S or r["rss_gib"] > RSS_LIMIT_GIB
        bad += over
        pre = "-" if r["prefill_tput"] is None else f"{r['prefill_tput']:,.0f}"
        print(f"{model:18}{topology:31}{r['wall_s']:>10.1f}{process_s:>10.1f}{r['rss_gib']:>9.2f}  {r['mode']:12}"
              f"{str(r['used']) + '/' + str(r['slice']):>10}{r['req_s']:>12,.1f}{r['tpot_ms']:>9.1f}"
              f"{r['decode_tput']:>14,.0f}{pre:>14}{'  OVER LIMIT' if over else ''}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
