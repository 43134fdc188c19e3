"""The three calibrated constants of the serving model, their data file, and how they are fitted.

All three are physical per-layer quantities, not scale factors on the whole prediction:
- launch_us_per_layer: kernel-launch and framework time per layer per microbatch (launches,
  synchronisation, sampling and scheduling that no priced kernel covers), us;
- token_us_per_layer: per-token framework work per layer on an Ascend 910C die (routing top-k and
  sort, dispatch packing, RoPE, KV-cache writes and block tables), us; other devices scale it by
  HBM bandwidth;
- overlap_efficiency: the share of the ideal compute/communication overlap that microbatching
  realises (0..1).
They are solved on the three end-to-end points of CloudMatrix-Infer (arXiv 2506.12708,
DeepSeek-R1 INT8; abstract and Tables 2-3): decode 1,943 tokens/s per NPU at TPOT 49.4 ms,
prefill 6,688 tokens/s per NPU, and decode 538 tokens/s per NPU under a 15 ms TPOT.
`bench/calibrate.py` re-derives them and rewrites the file; `bench/validate.py` checks them
against the published points they were not fitted on.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from costmodels.errors import InputError
from costmodels.model_shape import ModelShape

CALIBRATION_FILE = Path(__file__).with_name("calibration.json")

# Targets: CMI abstract + Tables 2-3.
DECODE_TARGET_TPS_PER_NPU = 1943.0
DECODE_TARGET_TPOT_MS = 49.4
PREFILL_TARGET_TPS_PER_NPU = 6688.0
LATENCY_TARGET_TPS_PER_NPU = 538.0  # CMI abstract: sustained under a 15 ms TPOT
LATENCY_TARGET_TPOT_MS = 15.0


@dataclass(frozen=True)
class Calibration:
    """The three constants (see the module doc); the defaults are the uncalibrated model."""

    launch_us_per_layer: float = 0.0
    overlap_efficiency: float = 1.0
    token_us_per_layer: float = 0.0

    def to_dict(self) -> dict:
        return {"launch_us_per_layer": self.launch_us_per_layer, "overlap_efficiency": self.overlap_efficiency,
                "token_us_per_layer": self.token_us_per_layer}


IDENTITY = Calibration()


@functools.lru_cache(maxsize=1)
def load_calibration() -> Calibration:
    """The fitted constants from calibration.json (checked: a corrupt file is an InputError)."""
    try:
        data = json.loads(CALIBRATION_FILE.read_text())
        cal = Calibration(launch_us_per_layer=float(data["launch_us_per_layer"]["value"]),
                          overlap_efficiency=float(data["overlap_efficiency"]["value"]),
                          token_us_per_layer=float(data["token_us_per_layer"]["value"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{CALIBRATION_FILE}: unreadable calibration ({exc}); regenerate it with "
                          "'python bench/calibrate.py --write'") from None
    if not (cal.launch_us_per_layer >= 0.0 and cal.token_us_per_layer >= 0.0 and 0.0 <= cal.overlap_efficiency <= 1.0):
        raise InputError(f"{CALIBRATION_FILE}: constants out of range {cal}; launch_us_per_layer and "
                          "token_us_per_layer must be >= 0 and overlap_efficiency in [0, 1]: regenerate it with "
                          "'python bench/calibrate.py --write'")
    return cal


def reference_deployments():
    """The §3 deployments behind the §4 points: (DecodeDeployment, PrefillDeployment, topology name)."""
    from costmodels.serving import DecodeDeployment, PrefillDeployment

    decode = DecodeDeployment(devices=160, ep=320, batch_per_device=96, kv_len=4096, mtp_accept=0.7,
                              quant="int8", microbatches=2)
    prefill = PrefillDeployment(devices=16, ep=32, prompt_len=4096, tokens_per_device=16384, quant="int8",
                                microbatches=2, imbalance=1.0)
    return decode, prefill, "cloudmatrix384"


def best_under_tpot(shape: ModelShape, topo, template, slo_ms: float, calibration: Calibration | None = None,
                    microbatches: tuple[int, ...] = (1, 2)) -> float:
    """Highest predicted tokens/s per device with TPOT <= slo_ms and memory that fits: bisection on the
    batch per device of `template` (a DecodeDeployment; TPOT rises with the batch), best over the
    microbatch counts an engine would try. 0 when even one sequence per device misses the SLO."""
    from dataclasses import replace

    from costmodels.serving import estimate_decode

    best = 0.0
    for m in microbatches:
        def est(batch: float, m: int = m):
            return estimate_decode(shape, topo, replace(template, batch_per_device=batch, microbatches=m), calibration)

        lo, hi = 1.0, 1024.0
        if est(lo).tpot_ms > slo_ms:
            continue
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if est(mid).tpot_ms <= slo_ms else (lo, mid)
        e = est(lo)
        if e.feasible:
            best = max(best, e.throughput_per_device)
    return best


def _bisect(f, lo: float, hi: float, target: float, rising: bool, steps: int = 30) -> float:
    """x in [lo, hi] with f(x) ~ target for monotone f (clamped to the ends)."""
    for _ in range(steps):
        mid = (lo + hi) / 2
        below = f(mid) < target
        lo, hi = (mid, hi) if below == rising else (lo, mid)
    return (lo + hi) / 2


def fit(shape: ModelShape) -> tuple[Calibration, dict]:
    """Solve the three constants on the three CMI points (nested bisections, each monotone):

    for an overlap efficiency e and a per-token time c, launch_us_per_layer L reproduces the decode
    step (49.4 ms x 1.7); for e, c reproduces the prefill batch time (16,384 / 6,688 s) with L
    re-solved; e reproduces 538 tokens/s per NPU at TPOT <= 15 ms (batch solved for the SLO).
    Returns the constants and a report of the uncalibrated model.
    """
    from costmodels.serving import estimate_decode, estimate_prefill
    from costmodels.topology import get_topology

    decode, prefill, topo_name = reference_deployments()
    topo = get_topology(topo_name)
    target_step_d = DECODE_TARGET_TPOT_MS * (1.0 + decode.mtp_accept)
    target_step_p = prefill.tokens_per_device / PREFILL_TARGET_TPS_PER_NPU * 1e3

    def launch(e: float, c: float) -> float:
        return _bisect(lambda x: estimate_decode(shape, topo, decode, Calibration(x, e, c)).step_ms,
                       0.0, 2000.0, target_step_d, rising=True)

    def token(e: float) -> float:
        return _bisect(lambda c: estimate_prefill(shape, topo, prefill, Calibration(launch(e, c), e, c)).step_ms,
                       0.0, 20.0, target_step_p, rising=True, steps=20)

    def latency_point(e: float) -> float:
        c = token(e)
        return best_under_tpot(shape, topo, decode, LATENCY_TARGET_TPOT_MS, Calibration(launch(e, c), e, c))

    e = _bisect(latency_point, 0.0, 1.0, LATENCY_TARGET_TPS_PER_NPU, rising=False, steps=16)
    c = token(e)
    cal = Calibration(launch_us_per_layer=launch(e, c), overlap_efficiency=e, token_us_per_layer=c)
    raw_d = estimate_decode(shape, topo, decode, calibration=IDENTITY)
    raw_p = estimate_prefill(shape, topo, prefill, calibration=IDENTITY)
    report = {
        "decode": {"uncalibrated_step_ms": raw_d.step_ms, "target_step_ms": target_step_d,
                   "uncalibrated_tps_per_npu": raw_d.throughput_per_device, "breakdown": raw_d.breakdown},
        "prefill": {"uncalibrated_step_ms": raw_p.step_ms, "target_step_ms": target_step_p,
                    "uncalibrated_tps_per_npu": raw_p.throughput_per_device, "breakdown": raw_p.breakdown},
        "latency": {"uncalibrated_tps_per_npu": best_under_tpot(shape, topo, decode, LATENCY_TARGET_TPOT_MS,
                                                                 IDENTITY),
                    "target_tps_per_npu": LATENCY_TARGET_TPS_PER_NPU},
    }
    return cal, report


def calibration_document(cal: Calibration, model: str) -> dict:
    """The JSON written to calibration.json: values, targets, and the method, for a reader."""
    return {
        "launch_us_per_layer": {
            "value": round(cal.launch_us_per_layer, 4),
            "meaning": "kernel-launch and framework time per layer per microbatch (us): launches, synchronisation, "
                       "sampling and scheduling that no priced kernel covers; 'launch_overhead' in breakdowns",
            "fitted_on": f"CMI abstract + Table 3: {DECODE_TARGET_TPS_PER_NPU:g} tokens/s per NPU at TPOT "
                         f"{DECODE_TARGET_TPOT_MS:g} ms",
            "deployment": "DeepSeek-R1 INT8 on cloudmatrix384: 160 NPUs, EP320, batch 96/NPU, KV 4096, "
                          "MTP 1 token @ 0.7, 2 microbatches, imbalance 1.0",
        },
        "token_us_per_layer": {
            "value": round(cal.token_us_per_layer, 6),
            "meaning": "per-token framework work per layer on one Ascend 910C die (routing top-k and sort, dispatch "
                       "packing, RoPE, KV-cache writes, block tables), us; scaled to other devices by HBM bandwidth; "
                       "'token_overhead' in breakdowns",
            "fitted_on": f"CMI abstract + Table 2: {PREFILL_TARGET_TPS_PER_NPU:g} tokens/s per NPU",
            "deployment": "DeepSeek-R1 INT8 on cloudmatrix384: 16 NPUs, EP32, 4096-token prompts, "
                          "16384 tokens per NPU, 2 microbatches, perfect balance",
        },
        "overlap_efficiency": {
            "value": round(cal.overlap_efficiency, 6),
            "meaning": "share of the ideal compute/communication overlap that microbatching realises; the time "
                       "it hides is the (negative) 'overlap' term of breakdowns",
            "fitted_on": f"CMI abstract: {LATENCY_TARGET_TPS_PER_NPU:g} tokens/s per NPU under a "
                         f"{LATENCY_TARGET_TPOT_MS:g} ms TPOT",
            "deployment": "the decode deployment above with the batch per NPU solved for the SLO (1 or 2 microbatches)",
        },
        "method": "nested bisections: overlap_efficiency for the 15 ms point, token_us_per_layer for the prefill "
                  "point, launch_us_per_layer for the 49.4 ms decode point, each re-solved inside the outer one",
        "model": model,
        "regenerate": "python bench/calibrate.py --write",
    }
