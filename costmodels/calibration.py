"""The two calibrated factors of the serving model, their data file, and how they are fitted.

Only the two end-to-end points of CloudMatrix-Infer (arXiv 2506.12708, DeepSeek-R1 INT8) are
used: decode 1,943 tokens/s per NPU at TPOT 49.4 ms, prefill 6,688 tokens/s per NPU. Each
fixes one factor in closed form; `bench/calibrate.py` re-derives them and rewrites the file.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from costmodels.errors import InputError
from costmodels.model_shape import ModelShape

CALIBRATION_FILE = Path(__file__).with_name("calibration.json")

# Targets: CMI abstract + Tables 2-3.
DECODE_TARGET_TPS_PER_NPU = 1943.0
DECODE_TARGET_TPOT_MS = 49.4
PREFILL_TARGET_TPS_PER_NPU = 6688.0


@dataclass(frozen=True)
class Calibration:
    """decode_overhead: modelled decode iteration x this = the real one (>= 1: launch gaps, sync,
    sampling, norms and every other op the roofline leaves out). prefill_efficiency: modelled
    prefill time / real time (<= 1)."""

    decode_overhead: float = 1.0
    prefill_efficiency: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)


IDENTITY = Calibration()


@functools.lru_cache(maxsize=1)
def load_calibration() -> Calibration:
    """The fitted factors from calibration.json (checked: a corrupt file is a InputError)."""
    try:
        data = json.loads(CALIBRATION_FILE.read_text())
        cal = Calibration(decode_overhead=float(data["decode_overhead"]["value"]),
                          prefill_efficiency=float(data["prefill_efficiency"]["value"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{CALIBRATION_FILE}: unreadable calibration ({exc}); regenerate it with "
                          "'python bench/calibrate.py --write'") from None
    if not (cal.decode_overhead >= 1.0 and 0.0 < cal.prefill_efficiency <= 1.0):
        raise InputError(f"{CALIBRATION_FILE}: factors out of range {cal}; decode_overhead must be >= 1 and "
                          "prefill_efficiency in (0, 1]: regenerate it with 'python bench/calibrate.py --write'")
    return cal


def reference_deployments():
    """The §3 deployments behind the §4 points: (DecodeDeployment, PrefillDeployment, topology name)."""
    from costmodels.serving import DecodeDeployment, PrefillDeployment

    decode = DecodeDeployment(devices=160, ep=320, batch_per_device=96, kv_len=4096, mtp_accept=0.7,
                              quant="int8", microbatches=2)
    prefill = PrefillDeployment(devices=16, ep=32, prompt_len=4096, tokens_per_device=16384, quant="int8",
                                microbatches=2, imbalance=1.0)
    return decode, prefill, "cloudmatrix384"


def fit(shape: ModelShape) -> tuple[Calibration, dict]:
    """Solve both factors from the uncalibrated model at the reference deployments.

    decode: TPOT = overhead x T_iter / (1 + a)  =>  overhead = 49.4 ms x 1.7 / T_iter (closed form).
    prefill: the batch time falls monotonically as the compute efficiency rises; bisect for the
    efficiency that gives 16,384 tokens / 6,688 tok/s. Returns the factors and a report.
    """
    from costmodels.serving import estimate_decode, estimate_prefill
    from costmodels.topology import get_topology

    decode, prefill, topo_name = reference_deployments()
    topo = get_topology(topo_name)
    raw_d = estimate_decode(shape, topo, decode, calibration=IDENTITY)
    raw_p = estimate_prefill(shape, topo, prefill, calibration=IDENTITY)
    target_step_d = DECODE_TARGET_TPOT_MS * (1.0 + decode.mtp_accept)
    target_step_p = prefill.tokens_per_device / PREFILL_TARGET_TPS_PER_NPU * 1e3
    lo, hi = 1e-3, 1.0
    for _ in range(60):  # bisection: step(eff) is decreasing in eff
        mid = (lo + hi) / 2
        step = estimate_prefill(shape, topo, prefill, calibration=Calibration(prefill_efficiency=mid)).step_ms
        lo, hi = (mid, hi) if step > target_step_p else (lo, mid)
    cal = Calibration(decode_overhead=target_step_d / raw_d.step_ms, prefill_efficiency=(lo + hi) / 2)
    report = {
        "decode": {"modelled_step_ms": raw_d.step_ms, "target_step_ms": target_step_d,
                   "uncalibrated_tps_per_npu": raw_d.throughput_per_device, "breakdown": raw_d.breakdown},
        "prefill": {"modelled_step_ms": raw_p.step_ms, "target_step_ms": target_step_p,
                    "uncalibrated_tps_per_npu": raw_p.throughput_per_device, "breakdown": raw_p.breakdown},
    }
    return cal, report


def calibration_document(cal: Calibration, model: str) -> dict:
    """The JSON written to calibration.json: values, targets, and the method, for a reader."""
    return {
        "decode_overhead": {
            "value": round(cal.decode_overhead, 6),
            "meaning": "real decode iteration / modelled roofline iteration; shown as 'scheduling' in breakdowns",
            "fitted_on": f"CMI abstract + Table 3: {DECODE_TARGET_TPS_PER_NPU:g} tokens/s per NPU at TPOT "
                         f"{DECODE_TARGET_TPOT_MS:g} ms",
            "deployment": "DeepSeek-R1 INT8 on cloudmatrix384: 160 NPUs, EP320, batch 96/NPU, KV 4096, "
                          "MTP 1 token @ 0.7, 2 microbatches, imbalance 1.0",
            "method": "overhead = TPOT_target x (1 + a) / modelled iteration (closed form)",
        },
        "prefill_efficiency": {
            "value": round(cal.prefill_efficiency, 6),
            "meaning": "achieved / roofline speed of prefill compute stages (attention, gate, experts, shared "
                       "experts, dense FFN, head); prefill communication keeps its measured cost",
            "fitted_on": f"CMI abstract + Table 2: {PREFILL_TARGET_TPS_PER_NPU:g} tokens/s per NPU",
            "deployment": "DeepSeek-R1 INT8 on cloudmatrix384: 16 NPUs, EP32, 4096-token prompts, "
                          "16384 tokens per NPU, 2 microbatches, perfect balance",
            "method": "bisection on the efficiency until the batch takes 16384 / 6688 s",
        },
        "model": model,
        "regenerate": "python bench/calibrate.py --write",
    }
