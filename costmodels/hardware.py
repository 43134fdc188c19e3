"""Accelerator spec sheets: Ascend 910C, A100, H100, H800, H200, B200, GB200 (and a nominal CPU process for `local:N`).

Values are per die (the unit podplan computes on) and one direction for links; a chip's
totals are the `chip_*` properties. Source keys (CMI, XDS, ...) name the papers listed in docs/costmodel.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from costmodels.errors import InputError

# The software platform serving engines target on a device: Ascend CANN (vllm-ascend, MindIE),
# NVIDIA CUDA (SGLang, vLLM, TensorRT-LLM) or plain CPU processes (podplan's local runtime).
Platform = Literal["ascend", "cuda", "cpu"]

# Bytes per element of each numeric format podplan prices.
# FP4 formats carry their block scales: MXFP4 (OCP MX spec v1.0, what gpt-oss ships) = 4-bit E2M1 values
# + one 8-bit E8M0 scale per 32 values = 4.25 bits; NVFP4 (NVIDIA Blackwell docs) = E2M1 + one FP8
# E4M3 scale per 16 values = 4.5 bits (its one FP32 per-tensor scale is negligible).
DTYPE_BYTES: dict[str, float] = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0,
                                 "mxfp4": 4.25 / 8, "nvfp4": 4.5 / 8}
FP4_FORMATS = ("mxfp4", "nvfp4")


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator. Compute and memory per die; link bandwidths per die, one direction, GB/s."""

    name: str
    dies: int
    bf16_tflops: float  # dense, per die
    fp8_tflops: float  # dense, per die; 0 = not supported
    int8_tops: float  # dense, per die
    hbm_gb: float  # per die
    hbm_tbps: float  # per die
    scaleup_gbps: float  # per die, one direction (UB / NVLink / shared memory)
    scaleout_gbps: float  # per die, one direction (RoCE / InfiniBand); 0 = none
    scaleup_fabric: str  # names the measured all-to-all profile costmodels.comm prices it with
    scaleout_fabric: str
    source: str
    platform: Platform
    nominal: bool = False  # placeholder figures, never calibrated: predictions on it are not meaningful
    # dense FP4 tensor-core peak per die (Blackwell); 0 = no FP4 compute (Hopper/Ampere run MXFP4
    # weight-only: weights stored in FP4, dequantised to BF16 in the GEMM kernel)
    fp4_tflops: float = 0.0
    # precision serving engines use on it by default: `estimate` and `compile` both take it
    default_quant: str = "bf16"
    # rows of the smallest tensor-core/cube tile a GEMM pads its token dimension to (see compute.py)
    gemm_tile_m: int = 64
    # (compute, memory) efficiency of the fused MLA decode kernel engines run on this device (absorbed
    # MQA-mode attention over the latent cache, BF16 math), when its authors published them; (0, 0) =
    # none published: the profile's or the published generic attention efficiencies apply
    fused_mla_decode_eff: tuple[float, float] = (0.0, 0.0)

    @property
    def chip_bf16_tflops(self) -> float:
        return self.bf16_tflops * self.dies

    @property
    def chip_int8_tops(self) -> float:
        return self.int8_tops * self.dies

    @property
    def chip_hbm_gb(self) -> float:
        return self.hbm_gb * self.dies

    @property
    def chip_hbm_tbps(self) -> float:
        return self.hbm_tbps * self.dies

    @property
    def chip_scaleup_gbps(self) -> float:
        return self.scaleup_gbps * self.dies

    @property
    def chip_scaleout_gbps(self) -> float:
        return self.scaleout_gbps * self.dies

    def supports(self, dtype: str) -> bool:
        """True if the die has tensor-core/cube support for matmuls in `dtype`."""
        return self.peak_tflops_or_zero(dtype) > 0

    def peak_tflops_or_zero(self, dtype: str) -> float:
        return {"bf16": self.bf16_tflops, "fp16": self.bf16_tflops, "fp8": self.fp8_tflops,
                "int8": self.int8_tops, "fp4": self.fp4_tflops, "mxfp4": self.fp4_tflops,
                "nvfp4": self.fp4_tflops}.get(dtype, 0.0)

    def supports_weights(self, quant: str) -> bool:
        """True if engines on this device serve weights stored in `quant`: a tensor-core format, or MXFP4
        weight-only on CUDA GPUs without FP4 compute (gpt-oss's MXFP4 kernels dequantise to BF16)."""
        if quant == "mxfp4":
            return self.platform == "cuda" or self.fp4_tflops > 0
        return self.supports(quant)

    def peak_tflops(self, dtype: str) -> float:
        """Dense peak of one die for matmuls in `dtype` (TFLOPS or TOPS)."""
        peak = self.peak_tflops_or_zero(dtype)
        if peak <= 0:
            raise InputError(
                f"{self.name}: {dtype} matmuls are not supported on this device; "
                f"use one of {', '.join(d for d in ('bf16', 'fp8', 'int8') if self.supports(d))}"
            )
        return peak

    @property
    def is_npu(self) -> bool:
        """An Ascend NPU (engines: vllm-ascend, MindIE) rather than a GPU or a CPU process."""
        return self.platform == "ascend"

    def to_dict(self) -> dict:
        """The spec sheet, what a topology's digest hashes: the figures, fabrics and source (the
        platform and the nominal mark describe the same device, so plans keep their digests)."""
        out = asdict(self)
        del out["platform"], out["nominal"], out["default_quant"], out["gemm_tile_m"], out["fused_mla_decode_eff"]
        if not out["fp4_tflops"]:
            del out["fp4_tflops"]  # devices without FP4 keep the digests their plans recorded
        return out


ASCEND_910C = DeviceSpec(
    name="Ascend 910C",
    dies=2,  # XDS §2.2 [P]
    bf16_tflops=376.0,  # CMI §3.3 [S]: 376 per die, 752 per chip
    fp8_tflops=0.0,  # XDS §4.7 [P]: FP8 not supported, INT8 used instead
    int8_tops=752.0,  # CMI Tables 2-3 [D]: 1,504 TOPS per chip, the efficiency denominator
    hbm_gb=64.0,  # CMI §3.3, Table 9 [S]: 128 GB per chip
    hbm_tbps=1.6,  # CMI §3.3, Table 9 [S]: 3.2 TB/s per chip
    scaleup_gbps=196.0,  # CMI §3.2 [S]: UB 7 links x 224 Gbps = 196 GB/s per die
    scaleout_gbps=25.0,  # CMI §3.2 [S]: RDMA 200 Gbps per die
    scaleup_fabric="UB",
    scaleout_fabric="RoCE",
    source="CMI §3.2-3.3, Tables 2-3, 9; XDS §2.2, §4.7",
    platform="ascend",
    default_quant="int8",  # CMI: DeepSeek-R1 served in INT8 (XDS §4.7: no FP8)
    gemm_tile_m=16,  # Ascend DaVinci cube unit: 16 x 16 x 16 per cycle (Huawei, Hot Chips 31, 2019)
)

# FlashMLA (deepseek-ai/FlashMLA README, "Performance"): the dense MLA decoding kernel SGLang, vLLM and
# TensorRT-LLM run on Hopper reaches 3,000 GB/s memory-bound and 660 TFLOPS compute-bound (BF16) on H800
# SXM5: 3,000 / 3,350 GB/s = 0.896 of HBM, 660 / 989 = 0.667 of the BF16 peak. It is one SM90 kernel;
# the fractions carry over to H100/H200 (same SMs, HBM3/HBM3e).
FLASH_MLA_HOPPER = (660.0 / 989.0, 3000.0 / 3350.0)

# NVIDIA SXM parts: NVIDIA's datasheets. INT8 dense = FP8 dense on Hopper (datasheet:
# 3,958 TOPS INT8 with sparsity, half of it dense). NVLink is quoted bidirectional: halve it.
# Scale-out: 8 x 400 Gb/s InfiniBand per 8-GPU node = 50 GB/s per GPU (DGX H100 datasheet: 8 x ConnectX-7).
H100 = DeviceSpec(
    name="H100 SXM",
    dies=1,
    bf16_tflops=989.0,  # spec sheet
    fp8_tflops=1979.0,  # spec sheet
    int8_tops=1979.0,  # spec sheet (3,958 sparse / 2)
    hbm_gb=80.0,  # spec sheet
    hbm_tbps=3.35,  # spec sheet
    scaleup_gbps=450.0,  # spec sheet: NVLink 900 GB/s bidirectional
    scaleout_gbps=50.0,  # DGX H100 datasheet: 400 Gb/s IB per GPU
    scaleup_fabric="NVLink",
    scaleout_fabric="InfiniBand",
    source="NVIDIA H100 SXM spec sheet",
    platform="cuda",
    default_quant="fp8",  # DSV3 ships FP8 weights (§3.3) and serves them on H800 (§3.4)
    gemm_tile_m=64,  # Hopper wgmma.mma_async: M = 64 rows per warpgroup instruction (PTX ISA)
    fused_mla_decode_eff=FLASH_MLA_HOPPER,
)

H800 = DeviceSpec(
    name="H800 SXM",
    dies=1,
    bf16_tflops=989.0,  # spec sheet
    fp8_tflops=1979.0,  # spec sheet
    int8_tops=1979.0,  # spec sheet (same tensor cores as H100)
    hbm_gb=80.0,  # spec sheet
    hbm_tbps=3.35,  # spec sheet
    scaleup_gbps=200.0,  # spec sheet: NVLink 400 GB/s bidirectional
    scaleout_gbps=50.0,  # DGX H100 datasheet: 400 Gb/s IB per GPU
    scaleup_fabric="NVLink",
    scaleout_fabric="InfiniBand",
    source="NVIDIA H800 SXM spec sheet",
    platform="cuda",
    default_quant="fp8",  # DSV3 ships FP8 weights (§3.3) and serves them on H800 (§3.4)
    gemm_tile_m=64,  # Hopper wgmma.mma_async: M = 64 rows per warpgroup instruction (PTX ISA)
    fused_mla_decode_eff=FLASH_MLA_HOPPER,
)

H200 = DeviceSpec(
    name="H200 SXM",
    dies=1,
    bf16_tflops=989.0,  # spec sheet
    fp8_tflops=1979.0,  # spec sheet
    int8_tops=1979.0,  # spec sheet
    hbm_gb=141.0,  # spec sheet
    hbm_tbps=4.8,  # spec sheet
    scaleup_gbps=450.0,  # spec sheet: NVLink 900 GB/s bidirectional
    scaleout_gbps=50.0,  # DGX H100 datasheet: 400 Gb/s IB per GPU
    scaleup_fabric="NVLink",
    scaleout_fabric="InfiniBand",
    source="NVIDIA H200 SXM spec sheet",
    platform="cuda",
    default_quant="fp8",  # DSV3 ships FP8 weights (§3.3) and serves them on H800 (§3.4)
    gemm_tile_m=64,  # Hopper wgmma.mma_async: M = 64 rows per warpgroup instruction (PTX ISA)
    fused_mla_decode_eff=FLASH_MLA_HOPPER,
)

# NVIDIA A100 SXM4 80GB: "NVIDIA A100 Tensor Core GPU" datasheet: BF16 312 TFLOPS dense, INT8 624 TOPS
# dense (1,248 sparse), no FP8, 80 GB HBM2e at 2,039 GB/s, NVLink 3 600 GB/s bidirectional. Scale-out:
# "NVIDIA DGX A100" datasheet: 8 x 200 Gb/s HDR InfiniBand per 8-GPU node = 25 GB/s per GPU.
A100 = DeviceSpec(
    name="A100 SXM 80GB",
    dies=1,
    bf16_tflops=312.0,
    fp8_tflops=0.0,
    int8_tops=624.0,
    hbm_gb=80.0,
    hbm_tbps=2.039,
    scaleup_gbps=300.0,
    scaleout_gbps=25.0,
    scaleup_fabric="NVLink",
    scaleout_fabric="InfiniBand",
    source="NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB); NVIDIA DGX A100 datasheet",
    platform="cuda",
    default_quant="bf16",  # no FP8 tensor cores
    gemm_tile_m=16,  # Ampere mma.sync m16n8k16: M = 16 rows (PTX ISA)
)

# NVIDIA B200 (HGX B200 / DGX B200): "NVIDIA HGX B200" datasheet gives 8-GPU totals with sparsity:
# FP4 144 PFLOPS, FP8 72 PFLOPS, INT8 72 POPS, BF16 36 PFLOPS, 1.44 TB HBM3e at 64 TB/s, NVLink 5
# 1.8 TB/s bidirectional per GPU. Per GPU dense = total / 8 / 2. Scale-out: "NVIDIA DGX B200"
# datasheet: 8 x 400 Gb/s ConnectX-7 = 50 GB/s per GPU.
B200 = DeviceSpec(
    name="B200",
    dies=1,  # two reticle dies, one CUDA device: podplan computes per device
    bf16_tflops=2250.0,
    fp8_tflops=4500.0,
    int8_tops=4500.0,
    hbm_gb=180.0,
    hbm_tbps=8.0,
    scaleup_gbps=900.0,
    scaleout_gbps=50.0,
    scaleup_fabric="NVLink",
    scaleout_fabric="InfiniBand",
    source="NVIDIA HGX B200 datasheet; NVIDIA DGX B200 datasheet",
    platform="cuda",
    fp4_tflops=9000.0,
    default_quant="fp8",
    gemm_tile_m=64,  # tcgen05.mma: smallest M of one CTA instruction is 64 (PTX ISA, sm_100)
)

# NVIDIA GB200 NVL72: "NVIDIA GB200 NVL72" datasheet gives 72-GPU rack totals with sparsity: FP4
# 1,440 PFLOPS, FP8 720 PFLOPS, INT8 720 POPS, BF16 360 PFLOPS, up to 13.4 TB HBM3e at 576 TB/s,
# NVLink 130 TB/s (1.8 TB/s bidirectional per GPU, all 72 GPUs in one NVLink domain). Per GPU dense =
# total / 72 / 2. Scale-out per GPU: 400 Gb/s (ConnectX-7 per GPU in the reference rack) = 50 GB/s.
GB200 = DeviceSpec(
    name="GB200",
    dies=1,
    bf16_tflops=2500.0,
    fp8_tflops=5000.0,
    int8_tops=5000.0,
    hbm_gb=186.0,
    hbm_tbps=8.0,
    scaleup_gbps=900.0,
    scaleout_gbps=50.0,
    scaleup_fabric="NVLink",
    scaleout_fabric="InfiniBand",
    source="NVIDIA GB200 NVL72 datasheet",
    platform="cuda",
    fp4_tflops=10000.0,
    default_quant="fp8",
    gemm_tile_m=64,  # tcgen05.mma (PTX ISA, sm_100)
)

# `local:N` runs the plan on CPU processes to check numerics; its numbers are nominal
# placeholders (no source: predictions on it are not meaningful and never calibrated).
CPU_PROCESS = DeviceSpec(
    name="CPU process",
    dies=1,
    bf16_tflops=0.5,  # nominal
    fp8_tflops=0.0,  # no fp8 matmuls on CPU
    int8_tops=0.5,  # nominal
    hbm_gb=16.0,  # nominal share of host memory
    hbm_tbps=0.05,  # nominal
    scaleup_gbps=5.0,  # nominal shared-memory copy rate (gloo)
    scaleout_gbps=0.0,
    scaleup_fabric="shm",
    scaleout_fabric="none",
    source="nominal placeholder (local runtime only)",
    platform="cpu",
    nominal=True,
    gemm_tile_m=1,  # nominal: CPU GEMMs do not pad to a tensor-core tile
)

DEVICES: dict[str, DeviceSpec] = {
    "ascend-910c": ASCEND_910C,
    "h100": H100,
    "h800": H800,
    "h200": H200,
    "a100": A100,
    "b200": B200,
    "gb200": GB200,
    "cpu": CPU_PROCESS,
}


def device_named(name: str) -> DeviceSpec:
    """The device whose spec-sheet name is `name` (what a plan records, e.g. "Ascend 910C")."""
    for spec in DEVICES.values():
        if spec.name == name:
            return spec
    known = ", ".join(repr(s.name) for s in DEVICES.values())
    raise InputError(f"unknown hardware {name!r}; known: {known}")


def dtype_bytes(dtype: str) -> float:
    """Bytes per element of `dtype`; unknown formats are an InputError naming the known ones."""
    if dtype not in DTYPE_BYTES:
        raise InputError(f"unknown dtype '{dtype}'; known: {', '.join(sorted(DTYPE_BYTES))}")
    return DTYPE_BYTES[dtype]
