"""The three calibration points are reproduced, and calibration.json matches a fresh fit."""

from __future__ import annotations

import json

import pytest

from costmodels import calibration
from costmodels.serving import estimate_decode, estimate_prefill
from costmodels.topology import get_topology

KEYS = ("launch_us_per_layer", "token_us_per_layer", "overlap_efficiency")


def test_file_is_documented_and_in_range():
    doc = json.loads(calibration.CALIBRATION_FILE.read_text())
    cal = calibration.load_calibration()
    assert cal.to_dict() == {k: doc[k]["value"] for k in KEYS}
    assert cal.launch_us_per_layer >= 0 and cal.token_us_per_layer >= 0 and 0 <= cal.overlap_efficiency <= 1
    for key in KEYS:
        assert {"fitted_on", "deployment", "meaning"} <= set(doc[key])
    assert len({doc[k]["fitted_on"] for k in KEYS}) == 3  # three different published points, no more


def test_reference_points_within_1_percent(dsv3):
    decode, prefill, topo_name = calibration.reference_deployments()
    topo = get_topology(topo_name)
    dec = estimate_decode(dsv3, topo, decode)
    pre = estimate_prefill(dsv3, topo, prefill)
    assert dec.throughput_per_device == pytest.approx(1943, rel=0.01)
    assert dec.tpot_ms == pytest.approx(49.4, rel=0.01)
    assert pre.throughput_per_device == pytest.approx(6688, rel=0.01)
    assert calibration.best_under_tpot(dsv3, topo, decode, 15.0) == pytest.approx(538, rel=0.01)


def test_stored_constants_match_a_fresh_fit(dsv3):
    fitted, report = calibration.fit(dsv3)
    stored = calibration.load_calibration()
    for key in KEYS:
        assert getattr(fitted, key) == pytest.approx(getattr(stored, key), rel=1e-3, abs=1e-4), \
            "run bench/calibrate.py --write"
    # the uncalibrated model (no launch or per-token time, ideal overlap) is optimistic at all three points
    assert report["decode"]["uncalibrated_step_ms"] < report["decode"]["target_step_ms"]
    assert report["prefill"]["uncalibrated_step_ms"] < report["prefill"]["target_step_ms"]
    assert report["latency"]["uncalibrated_tps_per_npu"] > report["latency"]["target_tps_per_npu"]


def test_corrupt_file_is_a_config_error(tmp_path, monkeypatch):
    from costmodels.errors import InputError

    bad = tmp_path / "calibration.json"
    bad.write_text("{not json")
    monkeypatch.setattr(calibration, "CALIBRATION_FILE", bad)
    calibration.load_calibration.cache_clear()
    try:
        with pytest.raises(InputError, match="bench/calibrate.py --write"):
            calibration.load_calibration()
    finally:
        calibration.load_calibration.cache_clear()
