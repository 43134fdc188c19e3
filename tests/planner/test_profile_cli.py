"""`podplan profile`: the measurement functions run on CPU at tiny sizes and produce the documented format;
without CUDA the command is one line on stderr and exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from costmodels import profiles
from planner.cli import profile

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_cpu_profile_has_every_section_and_loads(tmp_path):
    doc = profile.collect("cpu", quick=True, tiny=True, collectives=False)
    assert doc["format"] == profile.PROFILE_FORMAT and doc["version"] == profile.PROFILE_VERSION
    for key in ("name", "torch", "driver", "count"):
        assert key in doc["device"]
    m = doc["measurements"]
    assert m["hbm"]["tbps"] > 0 and m["launch"]["us"] > 0
    assert all(r["tflops"] > 0 for r in m["gemm"])
    assert {r["tokens_per_group"] for r in m["grouped_gemm"]} == {4, 16}
    assert all(r["us"] > 0 and r["impl"] in ("torch._grouped_mm", "loop") for r in m["grouped_gemm"])
    assert {r["kind"] for r in m["attention"]} == {"sdpa", "mla_decode"}
    assert all("us" in r for r in m["attention"]), [r.get("error") for r in m["attention"]]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    loaded = profiles.read_profile(path)  # the cost model's loader accepts what the command writes
    assert loaded.hbm_tbps == pytest.approx(m["hbm"]["tbps"])
    assert loaded.launch_us == pytest.approx(m["launch"]["us"])
    assert profile.summary(doc)[0].startswith(doc["device"]["name"])


def test_fp8_grouped_rows_time_or_name_their_error():
    """FP8 grouped GEMM rows count 1 byte per weight, or keep an error where torch or the device lacks the
    kernel (CPU builds may): never a crash and never a timing of another kernel."""
    rows = profile.measure_grouped_gemm("cpu", [(2, 4, 32, 64)], "fp8", reps=1)
    assert len(rows) == 1 and rows[0]["dtype"] == "fp8"
    r = rows[0]
    if "error" in r:
        assert "us" not in r and r["error"]
    else:
        assert r["impl"] == "torch._scaled_grouped_mm"
        assert r["tflops"] == pytest.approx(2 * 4 * r["weight_tbps"])  # 2 x tokens x (weights at 1 byte)


def test_podplan_experts_rows_time_or_name_their_error():
    """The runtime's experts kernel needs CUDA and Triton: elsewhere each row keeps an error, no timing."""
    rows = profile.measure_podplan_experts("cpu", [(8, 256, 128, 2)], reps=1)
    assert len(rows) == 1 and rows[0]["impl"] == "runtime.moe_triton" and rows[0]["tokens_per_expert"] == 2
    r = rows[0]
    if "error" in r:
        assert "us" not in r and r["error"]
    else:  # 8 experts x (gate, up, down) x 256 x 128 BF16 weights over the time
        assert r["weight_tbps"] == pytest.approx(8 * 3 * 256 * 128 * 2 / r["us"] / 1e6)


def test_collectives_over_two_cpu_processes():
    out = profile.measure_collectives(2, [1 << 10, 1 << 12], backend="gloo", device_type="cpu", reps=2)
    assert out["world"] == 2
    for op in ("all_reduce", "all_to_all"):
        assert [r["bytes"] for r in out[op]] == [1 << 10, 1 << 12]
        assert all(r["us"] > 0 and r["busbw_gbps"] > 0 for r in out[op])


def test_profile_without_cuda_is_one_line_exit_2():
    import torch

    if torch.cuda.is_available():  # the check below is about hosts without a GPU
        return
    proc = subprocess.run([sys.executable, "-m", "planner", "profile", "--quick"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1 and "CUDA" in proc.stderr


def test_hardware_keys_and_spec_comparison():
    assert profile.hardware_key("NVIDIA H200") == "h200"
    assert profile.hardware_key("NVIDIA H100 80GB HBM3") == "h100"
    assert profile.hardware_key("NVIDIA A100-SXM4-80GB") == "a100"
    assert profile.hardware_key("NVIDIA GB200") == "gb200" and profile.hardware_key("NVIDIA B200") == "b200"
    assert profile.hardware_key("NVIDIA RTX 4090") is None
    doc = profile.collect("cpu", quick=True, tiny=True, collectives=False)
    doc["device"]["name"] = "NVIDIA H200"  # the summary sets measured figures beside H200's spec sheet
    lines = profile.summary(doc)
    assert "spec 4.8 TB/s" in lines[0]
