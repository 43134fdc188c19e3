"""Spec sheets: per-die values, chip totals, supported formats."""

from __future__ import annotations

import pytest

from costmodels import compute
from costmodels.errors import InputError
from costmodels.hardware import ASCEND_910C, DEVICES, H100, H200, H800, dtype_bytes


def test_ascend_910c_per_die_and_per_chip():
    assert ASCEND_910C.dies == 2
    assert (ASCEND_910C.bf16_tflops, ASCEND_910C.chip_bf16_tflops) == (376.0, 752.0)
    assert (ASCEND_910C.int8_tops, ASCEND_910C.chip_int8_tops) == (752.0, 1504.0)
    assert (ASCEND_910C.chip_hbm_gb, ASCEND_910C.chip_hbm_tbps) == (128.0, 3.2)
    assert ASCEND_910C.chip_scaleup_gbps == 392.0 and ASCEND_910C.chip_scaleout_gbps == 50.0
    # RDMA is ~7.8x slower than UB per chip (CMI §3.2)
    assert ASCEND_910C.chip_scaleup_gbps / ASCEND_910C.chip_scaleout_gbps == pytest.approx(7.84)


def test_gpus_differ_where_the_spec_sheets_do():
    assert H100.scaleup_gbps == 450.0 and H800.scaleup_gbps == 200.0  # NVLink 900 vs 400 GB/s bidirectional
    assert H200.hbm_gb == 141.0 and H200.hbm_tbps == 4.8
    assert all(g.bf16_tflops == 989.0 and g.fp8_tflops == 1979.0 and g.scaleout_gbps == 50.0 for g in (H100, H800, H200))
    assert set(DEVICES) >= {"ascend-910c", "h100", "h800", "h200"}


def test_fp8_is_not_supported_on_ascend():
    assert not ASCEND_910C.supports("fp8") and ASCEND_910C.supports("int8") and H800.supports("fp8")
    with pytest.raises(InputError, match="fp8"):
        ASCEND_910C.peak_tflops("fp8")
    with pytest.raises(InputError, match=r"XDS §4\.7.*int8"):
        compute.precision("fp8", None, ASCEND_910C)
    with pytest.raises(InputError, match="kv-dtype fp8"):
        compute.precision("int8", "fp8", ASCEND_910C)


def test_dtype_bytes():
    assert [dtype_bytes(d) for d in ("fp32", "bf16", "fp8", "int8")] == [4, 2, 1, 1]
    with pytest.raises(InputError, match="known: bf16"):
        dtype_bytes("fp4")


def test_devices_say_what_runs_on_them():
    from costmodels.hardware import CPU_PROCESS, device_named

    assert ASCEND_910C.is_npu and ASCEND_910C.platform == "ascend"
    assert all(not g.is_npu and g.platform == "cuda" for g in (H100, H800, H200))
    assert CPU_PROCESS.nominal and not any(d.nominal for d in (ASCEND_910C, H100, H800, H200))
    assert device_named("Ascend 910C") is ASCEND_910C and device_named("H200 SXM") is H200
    with pytest.raises(InputError, match=r"unknown hardware 'TPU v5'; known: 'Ascend 910C'"):
        device_named("TPU v5")


def test_platform_is_not_part_of_the_spec_sheet_digest():
    # plans pin the topology by a digest of the spec sheet; describing the software platform
    # must not change it
    assert "platform" not in ASCEND_910C.to_dict() and "nominal" not in ASCEND_910C.to_dict()
    assert ASCEND_910C.to_dict()["scaleup_fabric"] == "UB"


def test_new_hardware_spec_sheets():
    from costmodels.hardware import A100, B200, DEVICES, GB200

    assert A100.fp8_tflops == 0 and A100.bf16_tflops == 312.0 and A100.default_quant == "bf16"
    assert B200.fp4_tflops == 2 * B200.fp8_tflops == 4 * B200.bf16_tflops
    assert GB200.hbm_tbps == B200.hbm_tbps == 8.0 and GB200.scaleup_gbps == 900.0
    assert {"a100", "b200", "gb200"} <= set(DEVICES)
    assert "fp4_tflops" in B200.to_dict() and "fp4_tflops" not in A100.to_dict()  # old digests keep


def test_gb200_nvl72_is_one_nvlink_domain_per_rack():
    from costmodels.topology import get_topology

    t = get_topology("gb200-nvl72:2")
    assert t.num_devices == 144 and t.scaleup_devices == 72
    assert t.pair_class(0, 71) == "server" and t.pair_class(0, 72) == "pod"
    assert t.bandwidth(0, 71) == 900.0 and t.bandwidth(0, 72) == 50.0
