"""The two calibration points are reproduced, and calibration.json matches a fresh fit."""

from __future__ import annotations

import json

import pytest

from costmodels import calibration
from costmodels.serving import estimate_decode, estimate_prefill
from costmodels.topology import get_topology


def test_file_is_documented_and_in_range():
    doc = json.loads(calibration.CALIBRATION_FILE.read_text())
    cal = calibration.load_calibration()
    assert cal.decode_overhead == doc["decode_overhead"]["value"] >= 1.0
    assert 0 < cal.prefill_efficiency == doc["prefill_efficiency"]["value"] <= 1.0
    for key in ("decode_overhead", "prefill_efficiency"):
        assert {"fitted_on", "deployment", "method", "meaning"} <= set(doc[key])


def test_reference_points_within_5_percent(dsv3):
    decode, prefill, topo_name = calibration.reference_deployments()
    topo = get_topology(topo_name)
    dec = estimate_decode(dsv3, topo, decode)
    pre = estimate_prefill(dsv3, topo, prefill)
    assert dec.throughput_per_device == pytest.approx(1943, rel=0.05)
    assert dec.tpot_ms == pytest.approx(49.4, rel=0.05)
    assert pre.throughput_per_device == pytest.approx(6688, rel=0.05)


def test_stored_factors_match_a_fresh_fit(dsv3):
    fitted, report = calibration.fit(dsv3)
    stored = calibration.load_calibration()
    assert fitted.decode_overhead == pytest.approx(stored.decode_overhead, rel=1e-4), "run bench/calibrate.py --write"
    assert fitted.prefill_efficiency == pytest.approx(stored.prefill_efficiency, rel=1e-4), "run bench/calibrate.py --write"
    # the uncalibrated model is optimistic at both points (a roofline is a bound)
    assert report["decode"]["modelled_step_ms"] < report["decode"]["target_step_ms"]
    assert report["prefill"]["modelled_step_ms"] < report["prefill"]["target_step_ms"]


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
