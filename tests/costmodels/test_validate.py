"""bench/validate.py: the validation table is complete, at most three points are calibration, and the
calibration points are the ones costmodels/calibration.py fits (the error target itself is reported, not asserted)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def validate():
    spec = importlib.util.spec_from_file_location("validate", ROOT / "bench" / "validate.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["validate"] = mod  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules["validate"]
    return mod


def test_table_is_complete_and_calibration_is_at_most_three(validate):
    table = validate.rows()
    assert len(table) == len(validate.POINTS) >= 12
    fields = ("model", "served", "hardware", "devices", "parallelism", "phase", "batch", "input_len", "precision",
              "metric", "published", "latency", "source")
    for r in table:
        for f in fields:
            assert r[f] not in (None, ""), f"{r['name']}: {f} is empty"
        assert math.isfinite(r["predicted"]) and r["predicted"] > 0, r["name"]
        assert r["error"] == pytest.approx((r["predicted"] - r["published"]) / r["published"])
    s = validate.summary(table)
    assert s["calibration"] <= validate.MAX_CALIBRATION == 3
    assert s["held_out"] == len(table) - s["calibration"] > 0
    assert s["median_abs_error"] <= s["worst_abs_error"]
    # the calibration points are reproduced (they are what calibration.json was fitted on)
    for r in table:
        if r["calibration"]:
            assert abs(r["error"]) < 0.01, r["name"]
    assert len({r["name"] for r in table}) == len(table)
    # the breadth: >= 3 hardware generations and >= 3 served models
    families = {fam for r in table for fam in ("Ascend", "Hopper", "Blackwell") if fam in r["hardware"]}
    assert families == {"Ascend", "Hopper", "Blackwell"}, s["hardware"]
    assert len(s["models"]) >= 3, s["models"]
    # small-batch latency-bound points sit beside the throughput-bound ones
    assert any(p.phase == "decode" and p.batch.split()[0] in ("1", "2", "4") for p in validate.POINTS)


def test_published_numbers_are_in_the_reference_or_its_sources(validate):
    for p in validate.POINTS:
        assert any(key in p.source for key in ("CMI", "Step-3", "DSV3", "XDS", "LMSYS", "TRT-LLM")), p.source
        if "[D" in p.source or "[D" in p.batch or "[D" in p.latency:  # a derived number shows its arithmetic
            assert ":" in (p.source + p.batch + p.latency).split("[D", 1)[1], p.name
