"""Re-derive the cost model's three calibrated constants and print how they reproduce CMI's two points.

    .venv/bin/python bench/calibrate.py          # print the table, check calibration.json is current
    .venv/bin/python bench/calibrate.py --write  # rewrite costmodels/calibration.json

Only the three CloudMatrix-Infer points are fitted (decode 1,943 tok/s/NPU at TPOT 49.4 ms,
prefill 6,688 tok/s/NPU, 538 tok/s/NPU under a 15 ms TPOT) into launch_us_per_layer,
token_us_per_layer and overlap_efficiency; a few GPU-cluster
deployments are printed as an unfitted sanity check (bench/validate.py holds the published points).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from costmodels.calibration import (
    CALIBRATION_FILE, DECODE_TARGET_TPOT_MS, DECODE_TARGET_TPS_PER_NPU, LATENCY_TARGET_TPOT_MS,
    LATENCY_TARGET_TPS_PER_NPU, PREFILL_TARGET_TPS_PER_NPU, best_under_tpot, calibration_document, fit,
    load_calibration, reference_deployments,
)
from costmodels.serving import DecodeDeployment, PrefillDeployment, estimate_decode, estimate_prefill
from costmodels.topology import get_topology
from planner.frontend.trace import model_shape

MODEL = "deepseek-v3"  # DeepSeek-R1 shares its architecture


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="rewrite costmodels/calibration.json")
    args = parser.parse_args()
    shape = model_shape(MODEL)
    cal, report = fit(shape)

    d, p = report["decode"], report["prefill"]
    print(f"{'constant':<22}{'fitted':>12}   uncalibrated step -> target step")
    print(f"{'launch_us_per_layer':<22}{cal.launch_us_per_layer:>12.2f}   decode {d['uncalibrated_step_ms']:.2f} ms -> "
          f"{d['target_step_ms']:.2f} ms")
    print(f"{'token_us_per_layer':<22}{cal.token_us_per_layer:>12.4f}   prefill {p['uncalibrated_step_ms']:.1f} ms -> "
          f"{p['target_step_ms']:.1f} ms")
    lat = report["latency"]
    print(f"{'overlap_efficiency':<22}{cal.overlap_efficiency:>12.4f}   15 ms point {lat['uncalibrated_tps_per_npu']:.0f} "
          f"-> {lat['target_tps_per_npu']:.0f} tokens/s per NPU")

    decode, prefill, topo_name = reference_deployments()
    topo = get_topology(topo_name)
    est_d = estimate_decode(shape, topo, decode, calibration=cal)
    est_p = estimate_prefill(shape, topo, prefill, calibration=cal)
    print()
    print(f"{'point':<40}{'target':>10}{'model':>10}{'error':>9}")
    rows = [
        ("decode tokens/s per NPU", DECODE_TARGET_TPS_PER_NPU, est_d.throughput_per_device),
        ("decode TPOT ms", DECODE_TARGET_TPOT_MS, est_d.tpot_ms),
        ("prefill tokens/s per NPU", PREFILL_TARGET_TPS_PER_NPU, est_p.throughput_per_device),
        (f"decode tokens/s per NPU, TPOT <= {LATENCY_TARGET_TPOT_MS:g} ms", LATENCY_TARGET_TPS_PER_NPU,
         best_under_tpot(shape, topo, decode, LATENCY_TARGET_TPOT_MS, cal)),
    ]
    for name, target, model in rows:
        print(f"{name:<40}{target:>10.1f}{model:>10.1f}{(model - target) / target:>9.2%}")

    print("\nunfitted sanity checks (same constants):")
    print(f"{'deployment':<64}{'tok/s/dev':>10}{'TPOT/TTFT ms':>14}{'feasible':>9}")
    checks = [
        ("h800-cluster:40 decode EP320 batch 96 fp8 MTP 0.8 2 mb", "h800-cluster:40",
         DecodeDeployment(devices=320, ep=320, batch_per_device=96, mtp_accept=0.8, quant="fp8", microbatches=2)),
        ("h800-cluster:4 prefill EP32 16k tok/dev fp8 2 mb", "h800-cluster:4",
         PrefillDeployment(devices=32, ep=32, tokens_per_device=16384, quant="fp8", microbatches=2)),
        ("h200-cluster:40 decode EP320 batch 96 fp8 MTP 0.8 2 mb", "h200-cluster:40",
         DecodeDeployment(devices=320, ep=320, batch_per_device=96, mtp_accept=0.8, quant="fp8", microbatches=2)),
        ("cloudmatrix384 decode batch 8/NPU int8 MTP 0.7 1 mb", "cloudmatrix384",
         DecodeDeployment(devices=160, ep=320, batch_per_device=8, mtp_accept=0.7, quant="int8")),
        ("cloudmatrix384 AFD 240+144 NPUs, 3 domains, batch 192 int8", "cloudmatrix384",
         DecodeDeployment(mode="disaggregated", attention_devices=240, moe_devices=144, dp_domains=3, batch_per_device=192,
                          mtp_accept=0.7, quant="int8", microbatches=2)),
    ]
    for name, tname, dep in checks:
        t = get_topology(tname)
        est = estimate_decode(shape, t, dep, cal) if isinstance(dep, DecodeDeployment) else estimate_prefill(
            shape, t, dep, cal)
        latency = est.tpot_ms if est.tpot_ms is not None else est.ttft_ms
        print(f"{name:<64}{est.throughput_per_device:>10.0f}{latency:>14.1f}{str(est.feasible):>9}")

    t0 = time.perf_counter()
    n = 2000
    for _ in range(n):
        estimate_decode(shape, topo, decode, calibration=cal)
    print(f"\none decode evaluation: {(time.perf_counter() - t0) / n * 1e6:.0f} us")

    doc = calibration_document(cal, f"{MODEL} (bundled zoo; DeepSeek-R1 has the same architecture)")
    text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
    if args.write:
        from planner.ir.fileio import write_atomic

        write_atomic(CALIBRATION_FILE, text)
        load_calibration.cache_clear()
        print(f"wrote {CALIBRATION_FILE}")
        return 0
    current = CALIBRATION_FILE.read_text() if CALIBRATION_FILE.exists() else ""
    if current != text:
        print(f"{CALIBRATION_FILE} is stale: run with --write", file=sys.stderr)
        return 1
    print(f"{CALIBRATION_FILE} is current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
