"""Hardware profiles: a measured file is read and used, H100/H800 are derived from H200 by spec ratios,
and without a file the cost model says it used spec-sheet values."""

from __future__ import annotations

import json

import pytest

from costmodels import compute, profiles
from costmodels.errors import InputError
from costmodels.hardware import H100, H200, H800


def _doc(hbm_tbps: float = 4.4) -> dict:
    return {
        "format": "podplan-hardware-profile", "version": 1, "date": "2026-12-02T15:00:00Z", "quick": True,
        "device": {"name": "NVIDIA H200", "count": 8, "driver": "570", "torch": "2.13.0"},
        "measurements": {
            "launch": {"us": 5.0}, "hbm": {"bytes": 1 << 30, "us": 1.0, "tbps": hbm_tbps},
            "gemm": [{"dtype": "bf16", "m": 4096, "n": 4096, "k": 7168, "us": 1.0, "tflops": 700.0},
                     {"dtype": "fp8", "m": 1, "n": 4096, "k": 7168, "error": "RuntimeError: too small"}],
            "grouped_gemm": [{"tokens_per_group": t, "n": 4096, "k": 7168, "groups": 32, "impl": "torch._grouped_mm",
                              "us": 1.0, "tflops": f, "weight_tbps": w}
                             for t, f, w in ((1, 5.0, 2.5), (64, 250.0, 3.0), (1024, 650.0, 0.5))]
                            + [{"dtype": "fp8", "tokens_per_group": t, "n": 4096, "k": 7168, "groups": 32,
                                "impl": "torch._scaled_grouped_mm", "us": 1.0, "tflops": f, "weight_tbps": w}
                               for t, f, w in ((1, 4.8, 2.4), (16, 77.0, 2.4), (32, 150.0, 2.3), (2048, 1000.0, 0.2))],
            "attention": [{"kind": "mla_decode", "kv_tbps": 3.9, "us": 1.0}],
            "podplan_experts": [{"impl": "runtime.moe_triton", "experts": 32, "hidden": 7168, "intermediate": 2048,
                                 "tokens_per_expert": t, "us": 1.0, "weight_tbps": w}
                                for t, w in ((1, 3.8), (32, 4.0), (64, 4.1), (128, 2.0))]
                               + [{"impl": "runtime.moe_triton", "experts": 128, "hidden": 2048, "intermediate": 768,
                                   "tokens_per_expert": t, "us": 1.0, "weight_tbps": w}
                                  for t, w in ((1, 3.0), (64, 3.4), (128, 1.0))],
            "collectives": {"world": 8, "all_reduce": [{"bytes": 1 << 28, "us": 1.0, "busbw_gbps": 360.0}]},
        },
    }


def test_read_derive_and_interpolate(tmp_path):
    path = tmp_path / "h200.json"
    path.write_text(json.dumps(_doc()))
    p = profiles.read_profile(path)
    assert not p.derived and p.hbm_tbps == 4.4 and p.launch_us == 5.0 and p.allreduce_busbw_gbps == 360.0
    assert p.gemm_efficiency("bf16", 989.0) == pytest.approx(700 / 989)
    assert p.gemm_efficiency("fp8", 1979.0) is None  # the failed row is not a measurement
    assert p.grouped_efficiency(8, 989.0) == pytest.approx((5 + (250 - 5) * 0.5) / 989)  # log2 halfway 1..64
    # the FP8 rows do not join the BF16 compute curve (1,000 FP8 TFLOPS over the BF16 peak would read > 1)
    assert p.grouped_efficiency(4096, 989.0) == pytest.approx(650 / 989)
    h100 = profiles.derive(p, H200, "h100", H100)
    assert h100.derived and "derived from h200" in h100.source
    assert h100.hbm_tbps == pytest.approx(4.4 * 3.35 / 4.8)
    assert h100.gemm_efficiency("bf16", 989.0) == pytest.approx(700 / 989)  # same tensor cores
    h800 = profiles.derive(p, H200, "h800", H800)
    assert h800.allreduce_busbw_gbps == pytest.approx(360.0 * 200 / 450)


def test_grouped_weight_stream_rate_per_format(tmp_path):
    path = tmp_path / "h200.json"
    path.write_text(json.dumps(_doc()))
    p = profiles.read_profile(path)
    assert p.grouped_stream_tbps("bf16") == pytest.approx(2.75)  # median of the <= 64-token rows: 2.5, 3.0
    assert p.grouped_stream_tbps("fp8") == pytest.approx(2.4)  # 2.4, 2.4, 2.3; the 2,048-token row is compute-bound
    assert p.grouped_stream_tbps("nvfp4") == pytest.approx(2.75)  # no rows of its own: the BF16 kernel family's
    h800 = profiles.derive(p, H200, "h800", H800)  # an H800 streams the same fraction of its own HBM
    assert h800.grouped_stream_tbps("fp8") / H800.hbm_tbps == pytest.approx(2.4 / H200.hbm_tbps)
    doc = _doc()
    for r in doc["measurements"]["grouped_gemm"]:
        r.pop("weight_tbps")
    path.write_text(json.dumps(doc))
    assert profiles.read_profile(path).grouped_stream_tbps("fp8") is None


def test_podplan_kernel_rate_is_read_and_derived(tmp_path):
    path = tmp_path / "h200.json"
    path.write_text(json.dumps(_doc()))
    p = profiles.read_profile(path)
    big, small = 3 * 7168 * 2048, 3 * 2048 * 768
    assert p.podplan_stream_median() == ((small, pytest.approx(3.2)), (big, pytest.approx(4.0)))  # <= 64 tokens
    # the measured grid itself: (parameters, tokens per expert) -> TB/s
    assert p.podplan_stream_tbps(big, 1) == pytest.approx(3.8) and p.podplan_stream_tbps(big, 128) == pytest.approx(2.0)
    assert p.podplan_stream_tbps(small, 64) == pytest.approx(3.4) and p.podplan_stream_tbps() == pytest.approx(3.8)
    # between measured points: linear in log(tokens), then in log(parameters); held flat outside the grid
    assert p.podplan_stream_tbps(big, 8) == pytest.approx(3.8 + 0.2 * 3 / 5)  # 8 tokens: 3/5 of the way 1 -> 32
    assert p.podplan_stream_tbps(big, 0.5) == pytest.approx(3.8) and p.podplan_stream_tbps(big, 4096) == pytest.approx(2.0)
    assert p.podplan_stream_tbps(small / 4, 1) == pytest.approx(3.0) and p.podplan_stream_tbps(big * 4, 1) == pytest.approx(3.8)
    mid = (small * big) ** 0.5  # halfway in log(parameters)
    assert p.podplan_stream_tbps(mid, 1) == pytest.approx(3.4) and p.podplan_stream_tbps(mid, 128) == pytest.approx(1.5)
    h800 = profiles.derive(p, H200, "h800", H800)
    assert h800.podplan_stream_tbps(big, 64) == pytest.approx(4.1 * H800.hbm_tbps / H200.hbm_tbps)
    doc = _doc()
    del doc["measurements"]["podplan_experts"]
    path.write_text(json.dumps(doc))
    assert profiles.read_profile(path).podplan_stream_tbps(big) == 0.0  # not measured: the copy rate stands in


def test_expert_gemms_stream_at_the_measured_grouped_rate(tmp_path, monkeypatch):
    """A decode-sized expert GEMM is priced at the profile's grouped weight-read rate for its format,
    not at the plain copy bandwidth; dense GEMMs keep the copy rate."""
    (tmp_path / "h200.json").write_text(json.dumps(_doc()))
    monkeypatch.setattr(profiles, "PROFILE_DIR", tmp_path)
    profiles._load.cache_clear()
    compute.efficiencies.cache_clear()
    try:
        eff = compute.efficiencies(H200)
        assert eff.of("expert_gemm", "fp8")[1] == pytest.approx(2.4 / 4.8)
        assert eff.of("expert_gemm", "bf16")[1] == pytest.approx(2.75 / 4.8)
        assert eff.of("dense_gemm", "fp8")[1] == pytest.approx(4.4 / 4.8)
        assert eff.of("podplan_expert_gemm", "bf16", 3 * 7168 * 2048, 32)[1] == pytest.approx(4.0 / 4.8)  # podplan's kernel
        assert eff.of("podplan_expert_gemm", "bf16", 3 * 2048 * 768, 1)[1] == pytest.approx(3.0 / 4.8)  # small experts
        weights = 32 * 4096 * 7168  # 32 FP8 experts, one token each: weight reads dominate
        us = compute.roofline_us(H200, "expert_gemm", 2.0 * weights, weights, "fp8")
        assert us == pytest.approx(weights / (2.4e6))
    finally:
        profiles._load.cache_clear()
        compute.efficiencies.cache_clear()


def test_bundled_folder_is_used_and_falls_back(tmp_path, monkeypatch):
    (tmp_path / "h200.json").write_text(json.dumps(_doc()))
    assert profiles.profile_for(H100, tmp_path).derived
    assert profiles.profile_for(H200, tmp_path).source.startswith("measured")
    empty = tmp_path / "none"
    empty.mkdir()
    assert profiles.profile_for(H200, empty) is None
    monkeypatch.setattr(profiles, "PROFILE_DIR", empty)
    profiles._load.cache_clear()
    compute.efficiencies.cache_clear()
    try:
        assert profiles.source_of(H200).startswith("spec sheet")
        assert compute.efficiencies(H200) is compute.PUBLISHED
        monkeypatch.setattr(profiles, "PROFILE_DIR", tmp_path)
        profiles._load.cache_clear()
        compute.efficiencies.cache_clear()
        eff = compute.efficiencies(H200)
        assert eff.gemm_memory == pytest.approx(4.4 / 4.8) and eff.dense_gemm == pytest.approx(700 / 989)
        assert eff.source.startswith("measured")
    finally:
        profiles._load.cache_clear()
        compute.efficiencies.cache_clear()


def test_estimate_says_which_source_it_used(dsv3):
    from costmodels.serving import DecodeDeployment, estimate_decode
    from costmodels.topology import get_topology

    est = estimate_decode(dsv3, get_topology("h200-cluster:2"), DecodeDeployment(batch_per_device=32))
    assert est.details["hardware_source"] == profiles.source_of(H200)
    assert est.details["quant"] == "fp8"  # Hopper's default


def test_bad_profile_is_one_line_error(tmp_path):
    bad = tmp_path / "h200.json"
    bad.write_text(json.dumps({**_doc(), "version": 99}))
    with pytest.raises(InputError, match="podplan profile"):
        profiles.read_profile(bad)


def test_podplan_runtime_experts_stream_at_their_own_kernels_rate(dsv3):
    """`podplan run` topologies (h200:N) run podplan's own expert kernel, at its measured rate (or the copy
    rate without one); cluster topologies run an engine's grouped GEMM at the profile's grouped rate. At 2 sequences per GPU
    the experts are weight reads, so the two differ by the ratio of the two rates."""
    from costmodels.serving import DecodeDeployment, estimate_decode
    from costmodels.topology import get_topology

    dep = DecodeDeployment(devices=8, ep=8, batch_per_device=2, quant="fp8")
    host = estimate_decode(dsv3, get_topology("h200:8"), dep).breakdown["experts"]
    cluster = estimate_decode(dsv3, get_topology("h200-cluster:1"), dep).breakdown["experts"]
    eff = compute.efficiencies(H200)
    grouped, copy = eff.of("expert_gemm", "fp8")[1], eff.of("podplan_expert_gemm", "fp8")[1]
    assert grouped < copy
    assert cluster / host == pytest.approx(copy / grouped, rel=0.02)


def test_roofline_reproduces_the_bundled_grouped_rows():
    """The expert-GEMM roofline with the bundled H200 profile's efficiencies re-predicts the profile's own
    grouped GEMM rows: every BF16 row and the FP8 rows up to 128 tokens per group (weight streaming) within
    a median 10%. FP8 rows beyond are priced at the BF16 compute fraction (DeepGEMM-class, docs/profile.md),
    so torch's slower FP8 kernel is not the target there."""
    import statistics

    doc = json.loads((profiles.PROFILE_DIR / "h200.json").read_text())
    errors: dict[str, list[float]] = {"bf16": [], "fp8": []}
    for r in doc["measurements"]["grouped_gemm"]:
        if "us" not in r or (r["dtype"] == "fp8" and r["tokens_per_group"] > 128):
            continue
        wb = 1.0 if r["dtype"] == "fp8" else 2.0
        pred = compute.gemm_us(H200, "expert_gemm", tokens=r["tokens_per_group"], params=r["n"] * r["k"],
                               weight_bytes=wb, dtype=r["dtype"], groups=r["groups"],
                               extra_bytes=r["groups"] * r["tokens_per_group"] * r["k"] * wb)
        errors[r["dtype"]].append(abs(pred / r["us"] - 1))
    assert len(errors["bf16"]) >= 40 and len(errors["fp8"]) >= 30
    for dtype, errs in errors.items():
        assert statistics.median(errs) <= 0.10, (dtype, statistics.median(errs))


def test_podplan_runtime_prices_its_experts_by_size_and_tokens():
    """`podplan run` topologies read podplan's kernel's measured grid at the model's expert size and its
    tokens per touched expert: Qwen3-30B-A3B's 9.4 MB experts stream slower than DeepSeek-V3's 88 MB ones,
    and the estimate reports the rate it used."""
    from costmodels.serving import DecodeDeployment, estimate_decode
    from costmodels.topology import get_topology
    from planner.frontend.trace import model_shape

    prof = profiles.profile_for(H200)
    assert prof is not None and len(prof.podplan_stream) >= 2  # the bundled profile holds two expert sizes
    qwen, dsv3 = model_shape("qwen3-30b-a3b"), model_shape("deepseek-v3")
    assert prof.podplan_stream_tbps(qwen.params_expert, 2) < prof.podplan_stream_tbps(dsv3.params_expert, 2)
    est = estimate_decode(qwen, get_topology("h200:1"), DecodeDeployment(devices=1, batch_per_device=32, quant="bf16"))
    d = est.details
    per_expert = 32 * qwen.top_k / d["experts_touched_per_die"]
    assert d["expert_stream_tbps"] == pytest.approx(prof.podplan_stream_tbps(qwen.params_expert, per_expert))
