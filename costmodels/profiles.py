"""Measured hardware profiles (what `podplan profile` writes) and the figures the cost model takes from them.

A profile is costmodels/profiles/<key>.json (key as in costmodels.hardware.DEVICES: "h200", ...), in
the format of docs/profile.md. `profile_for(hw)` returns the measured profile of that device, or one
derived from a measured sibling by documented spec-sheet ratios (H100/H800 from H200: same tensor
cores, so GEMM and attention compute carry over; HBM bandwidth scales by the datasheet ratio; NVLink
collectives by the NVLink ratio), or None, in which case the cost model uses spec-sheet values.
Everything here is plain JSON arithmetic: no torch.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from costmodels.errors import InputError
from costmodels.hardware import DEVICES, DeviceSpec

PROFILE_DIR = Path(__file__).with_name("profiles")
PROFILE_FORMAT = "podplan-hardware-profile"
SUPPORTED_VERSIONS = (1,)

# Derived profiles: device key -> the measured key it is derived from. Ratios are the spec sheets'
# (costmodels/hardware.py): H100/H800 SXM share H200's GH100 tensor cores and clocks (989 / 1,979
# TFLOPS dense BF16 / FP8 on all three datasheets), so compute efficiencies carry over unchanged.
DERIVED_FROM = {"h100": "h200", "h800": "h200"}


@dataclass(frozen=True)
class GemmPoint:
    dtype: str
    m: int  # tokens (rows)
    n: int
    k: int
    tflops: float


# Tokens per expert up to which a grouped GEMM is bound by streaming its weights (on H200 every measured
# shape at <= 64 tokens per group sits on a flat weight-read rate; BF16 turns compute-bound by 256).
SMALL_GROUP_TOKENS = 64


# A family of measured curves: per size, (x, y) points; both levels sorted by their first element.
Curves = tuple[tuple[float, tuple[tuple[float, float], ...]], ...]


@dataclass(frozen=True)
class GroupedPoint:
    tokens_per_group: int
    n: int
    k: int
    tflops: float
    dtype: str = "bf16"
    weight_tbps: float = 0.0  # expert weights read / time


@dataclass(frozen=True)
class HardwareProfile:
    """The measured figures the serving model uses, with where they came from."""

    key: str
    device_name: str
    source: str  # "measured <date> (torch X, driver Y)" or "derived from h200 by spec ratios (...)"
    derived: bool
    hbm_tbps: float  # achieved device-to-device copy bandwidth
    launch_us: float  # one eager kernel launch
    gemm: tuple[GemmPoint, ...] = ()
    grouped: tuple[GroupedPoint, ...] = ()
    mla_decode_kv_tbps: float = 0.0  # best achieved KV read rate of the MLA decode measurement (0 = none)
    # weight-read rate of podplan's own experts kernel (runtime.moe_triton), what `podplan run` plans stream at:
    # per measured expert size (parameters of one expert), its (tokens per expert, TB/s) curve; both sorted;
    # empty = not measured
    podplan_stream: Curves = ()
    allreduce_busbw_gbps: float = 0.0  # largest-message NCCL all-reduce bus bandwidth (0 = not measured)
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def gemm_efficiency(self, dtype: str, peak_tflops: float) -> float | None:
        """Best achieved / peak over the measured large-M GEMMs of `dtype` (None when none were measured)."""
        rows = [g.tflops for g in self.gemm if g.dtype == dtype and g.m >= 1024]
        return min(1.0, max(rows) / peak_tflops) if rows and peak_tflops > 0 else None

    def grouped_stream_tbps(self, dtype: str) -> float | None:
        """Median weight-read rate (TB/s) of the measured grouped GEMMs of `dtype` at <= SMALL_GROUP_TOKENS
        tokens per group: what a decode-sized expert GEMM streams its weights at. A precision with no rows
        of its own takes the BF16 rows (the same kernel family); None without any."""
        for dt in (dtype, "bf16"):
            rates = [g.weight_tbps for g in self.grouped
                     if g.dtype == dt and g.tokens_per_group <= SMALL_GROUP_TOKENS and g.weight_tbps > 0]
            if rates:
                return statistics.median(rates)
        return None

    def podplan_stream_tbps(self, expert_params: float = 0.0, tokens_per_expert: float = 1.0) -> float:
        """podplan's experts kernel's weight-read rate (TB/s) for experts of `expert_params` parameters with
        `tokens_per_expert` rows each, from the measured grid (`curves_interp`; 0 = not measured)."""
        return curves_interp(self.podplan_stream, expert_params, tokens_per_expert) if self.podplan_stream else 0.0

    def podplan_stream_median(self) -> tuple[tuple[float, float], ...]:
        """(expert parameters, median TB/s at <= SMALL_GROUP_TOKENS tokens per expert) per measured size:
        the headline figure `podplan profile` prints."""
        return tuple((size, statistics.median(r for t, r in curve if t <= SMALL_GROUP_TOKENS))
                     for size, curve in self.podplan_stream if any(t <= SMALL_GROUP_TOKENS for t, _ in curve))

    def grouped_efficiency(self, tokens_per_group: float, peak_tflops: float) -> float | None:
        """Achieved / peak BF16 compute of a grouped GEMM at `tokens_per_group`, interpolated in log2 over the
        measured BF16 points (largest weight shape at each token count); None without measurements."""
        by_t: dict[int, float] = {}
        for g in self.grouped:
            if g.dtype != "bf16":
                continue
            by_t[g.tokens_per_group] = max(by_t.get(g.tokens_per_group, 0.0), g.tflops)
        if not by_t or peak_tflops <= 0:
            return None
        pts = tuple(sorted((float(t), f) for t, f in by_t.items()))
        return min(1.0, log_interp(pts, max(tokens_per_group, pts[0][0])) / peak_tflops)


def log_interp(points: tuple[tuple[float, float], ...], x: float) -> float:
    """y at `x` on the curve through `points` (x > 0, sorted by x), linear in log(x), held flat outside them;
    x <= 0 takes the last point."""
    if x <= 0 or x >= points[-1][0]:
        return points[-1][1]
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            w = math.log(x / x0) / math.log(x1 / x0) if x1 > x0 else 0.0
            return (1 - w) * y0 + w * y1
    return points[-1][1]


def curves_interp(curves: Curves, size: float, x: float) -> float:
    """y of a family of curves, one per size: each curve at `x` (log_interp), then across sizes at `size`
    (log_interp; size <= 0 takes the largest)."""
    return log_interp(tuple((s, log_interp(curve, x)) for s, curve in curves), size)


def _podplan_stream(rows: list[dict]) -> Curves:
    """Per measured expert shape (parameters of one expert), the (tokens per expert, weight_tbps) curve."""
    by_size: dict[float, dict[float, float]] = {}
    for r in rows:
        if "weight_tbps" in r:
            size = 3.0 * int(r["hidden"]) * int(r["intermediate"])  # gate, up and down
            by_size.setdefault(size, {})[float(r["tokens_per_expert"])] = _num(r["weight_tbps"], "podplan_experts")
    return tuple((size, tuple(sorted(curve.items()))) for size, curve in sorted(by_size.items()))


def _num(x: object, where: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
        raise ValueError(f"{where}: expected a finite number >= 0, got {x!r}")
    return float(x)


def profile_from_doc(doc: dict, key: str, filename: str = "") -> HardwareProfile:
    """The figures the cost model takes from one profile document (`podplan profile`'s JSON); a malformed
    document raises ValueError, KeyError or TypeError."""
    if doc.get("format") != PROFILE_FORMAT:
        raise ValueError(f"format is {doc.get('format')!r}, expected {PROFILE_FORMAT!r}")
    if doc.get("version") not in SUPPORTED_VERSIONS:
        raise ValueError(f"version {doc.get('version')!r} is not one of {SUPPORTED_VERSIONS}")
    m = doc["measurements"]
    dev = doc["device"]
    gemm = tuple(GemmPoint(str(r["dtype"]), int(r["m"]), int(r["n"]), int(r["k"]), _num(r["tflops"], "gemm"))
                 for r in m.get("gemm", []) if "tflops" in r)
    grouped = tuple(GroupedPoint(int(r["tokens_per_group"]), int(r["n"]), int(r["k"]),
                                 _num(r["tflops"], "grouped_gemm"), str(r.get("dtype", "bf16")),
                                 _num(r.get("weight_tbps", 0.0), "grouped_gemm"))
                    for r in m.get("grouped_gemm", []) if "tflops" in r)
    mla = [_num(r["kv_tbps"], "attention") for r in m.get("attention", [])
           if r.get("kind") == "mla_decode" and "kv_tbps" in r]
    col = m.get("collectives") or {}
    ar = [_num(r["busbw_gbps"], "collectives") for r in col.get("all_reduce", [])]
    where = f"; {filename}" if filename else ""
    return HardwareProfile(
        key=key, device_name=str(dev["name"]),
        source=f"measured {doc['date']} (torch {dev.get('torch')}, driver {dev.get('driver')}{where})",
        derived=False, hbm_tbps=_num(m["hbm"]["tbps"], "hbm"), launch_us=_num(m["launch"]["us"], "launch"),
        gemm=gemm, grouped=grouped, mla_decode_kv_tbps=max(mla, default=0.0),
        allreduce_busbw_gbps=max(ar, default=0.0),
        podplan_stream=_podplan_stream(m.get("podplan_experts", [])),
    )


def read_profile(path: Path, key: str | None = None) -> HardwareProfile:
    """Parse and check one profile file; a malformed file is an InputError naming the file and the fix."""
    try:
        return profile_from_doc(json.loads(Path(path).read_text()), key or Path(path).stem, Path(path).name)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"{path}: not a readable hardware profile ({exc}); re-measure it with 'podplan profile "
                         f"-o {path}' on that hardware or delete it to use spec-sheet values") from None


def derive(measured: HardwareProfile, measured_hw: DeviceSpec, target_key: str, target_hw: DeviceSpec) -> HardwareProfile:
    """A profile for `target_hw` from one measured on `measured_hw` by spec-sheet ratios (marked derived)."""
    hbm = target_hw.hbm_tbps / measured_hw.hbm_tbps
    link = target_hw.scaleup_gbps / measured_hw.scaleup_gbps
    comp = target_hw.bf16_tflops / measured_hw.bf16_tflops
    return HardwareProfile(
        key=target_key, device_name=target_hw.name,
        source=(f"derived from {measured.key} ({measured.source}) by spec ratios: HBM x{hbm:.3f}, compute x{comp:.3f}, "
                f"NVLink x{link:.3f}"),
        derived=True, hbm_tbps=measured.hbm_tbps * hbm, launch_us=measured.launch_us,
        gemm=tuple(GemmPoint(g.dtype, g.m, g.n, g.k, g.tflops * comp) for g in measured.gemm),
        grouped=tuple(GroupedPoint(g.tokens_per_group, g.n, g.k, g.tflops * comp, g.dtype, g.weight_tbps * hbm)
                      for g in measured.grouped),
        mla_decode_kv_tbps=measured.mla_decode_kv_tbps * hbm, allreduce_busbw_gbps=measured.allreduce_busbw_gbps * link,
        podplan_stream=tuple((size, tuple((t, rate * hbm) for t, rate in curve))
                             for size, curve in measured.podplan_stream),
    )


def _key_of(hw: DeviceSpec) -> str | None:
    for key, spec in DEVICES.items():
        if spec is hw or spec.name == hw.name:
            return key
    return None


@functools.lru_cache(maxsize=16)
def _load(key: str, folder: str) -> HardwareProfile | None:
    path = Path(folder) / f"{key}.json"
    if path.exists():
        return read_profile(path, key)
    base = DERIVED_FROM.get(key)
    if base and (Path(folder) / f"{base}.json").exists():
        return derive(read_profile(Path(folder) / f"{base}.json", base), DEVICES[base], key, DEVICES[key])
    return None


def profile_for(hw: DeviceSpec, folder: Path | None = None) -> HardwareProfile | None:
    """The bundled measured (or derived) profile of `hw`, or None: then spec-sheet values apply."""
    key = _key_of(hw)
    if key is None:
        return None
    return _load(key, str(folder or PROFILE_DIR))


def source_of(hw: DeviceSpec) -> str:
    """What an estimate's numbers for `hw` rest on, for Estimate.details."""
    prof = profile_for(hw)
    if prof is None:
        return f"spec sheet ({hw.source})"
    return prof.source
