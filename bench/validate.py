"""Validation table: the cost model's predictions beside published serving points, with the error of each.

    .venv/bin/python bench/validate.py          # print the table, the median and worst held-out error
    .venv/bin/python bench/validate.py --json   # the same as JSON

Every published number comes from a primary source named in its `source` (the keys are listed in
docs/costmodel.md "Sources": CMI = arXiv 2506.12708, Step-3 = arXiv 2507.19427, LMSYS = the SGLang
team's blog posts, TRT-LLM = TensorRT-LLM's DeepSeek-R1 performance guide); numbers derived from a
source are marked [D] with their arithmetic. Nothing is tuned here. At most three points are
calibration (`calibration=True`: what costmodels/calibration.py fits on); all others are held out.
Points given as "throughput at a TPOT SLO" are predicted the same way: the largest batch per
device whose predicted TPOT meets the SLO, and its throughput (costmodels.calibration.best_under_tpot).
Aggregated (in-flight batching) points use costmodels.aggregated; where a source leaves the layout
open the point takes the best prediction over the layouts it allows (`_best_of`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass

from costmodels.aggregated import AggregatedDeployment, estimate_aggregated
from costmodels.calibration import best_under_tpot
from costmodels.model_shape import ModelShape
from costmodels.serving import DecodeDeployment, PrefillDeployment, estimate_decode, estimate_prefill
from costmodels.topology import get_topology

MAX_CALIBRATION = 3


@dataclass(frozen=True)
class Point:
    """One published serving point and how to predict it."""

    name: str
    model: str  # bundled zoo name whose architecture the served model shares
    served: str  # the model the source served
    hardware: str
    topology: str
    devices: int
    parallelism: str
    phase: str  # decode | prefill (PD-disaggregated: the phase's own instance)
    batch: str  # batch or concurrency per device, as published or derived
    input_len: int
    output_len: int | None
    precision: str
    metric: str  # what `published` measures
    published: float
    latency: str  # the published latency figure or SLO
    source: str
    calibration: bool
    predict: Callable[[ModelShape], float]


def _decode(topo: str, **kw) -> Callable[[ModelShape], float]:
    def run(shape: ModelShape) -> float:
        return estimate_decode(shape, get_topology(topo), DecodeDeployment(**kw)).throughput_per_device
    return run


def _prefill(topo: str, **kw) -> Callable[[ModelShape], float]:
    def run(shape: ModelShape) -> float:
        return estimate_prefill(shape, get_topology(topo), PrefillDeployment(**kw)).throughput_per_device
    return run


def _under_tpot(topo: str, slo_ms: float, **kw) -> Callable[[ModelShape], float]:
    return lambda shape: best_under_tpot(shape, get_topology(topo), DecodeDeployment(**kw), slo_ms)


def _best_of(*predictors: Callable[[ModelShape], float]) -> Callable[[ModelShape], float]:
    """The best prediction over layouts the source does not pin down (what an engine tuner would pick)."""
    return lambda shape: max(p(shape) for p in predictors)


def _aggregated(topo: str, input_len: int, output_len: int, max_num_tokens: int = 0, chunked: bool = True,
                **kw) -> Callable[[ModelShape], float]:
    """Output tokens/s per device of an aggregated (in-flight batching) instance: TRT-LLM's trtllm-bench."""
    def run(shape: ModelShape) -> float:
        dep = AggregatedDeployment(DecodeDeployment(**kw), input_len=input_len, output_len=output_len,
                                   max_num_tokens=max_num_tokens, chunked=chunked)
        return estimate_aggregated(shape, get_topology(topo), dep).throughput_per_device
    return run


def _ratio(predict: Callable[..., Callable[[ModelShape], float]], topo: str, field: str, a: object, b: object,
           **kw) -> Callable[[ModelShape], float]:
    """`predict` (_decode or _prefill) with `field` = a over the same with `field` = b, the rest fixed:
    a published gain (2 microbatches / 1) or ratio (short / long prompts) of one deployment."""
    num, den = predict(topo, **{field: a}, **kw), predict(topo, **{field: b}, **kw)
    return lambda shape: num(shape) / den(shape)


# CMI §3 deployment: decode 160 NPUs, EP320, attention DP320,
# MTP 1 draft at ~70%, KV 4,096; INT8.
_CMI_DECODE = dict(devices=160, ep=320, kv_len=4096, mtp_accept=0.7, quant="int8")

# SGLang's decode instance of the 96xH100 blog: 9 nodes, EP72 over 256 routed + 32 redundant experts.
_SGLANG_H100_DECODE = dict(devices=72, ep=72, redundant_experts=32, kv_len=2000, quant="fp8")

def _prefill_vs_4k(prompt: int, node_tps: int) -> Point:
    """The 96xH100 blog's prefill at `prompt`-token prompts over 4K ones (50,302 tok/s per node), the rest of
    sglang-h100-prefill unchanged: a held-out ratio."""
    k = prompt // 1024
    return Point(
        f"sglang-h100-prefill-{k}k-vs-4k", "deepseek-v3", "DeepSeek-V3", "H100 SXM (Hopper)", "h100-cluster:4", 32,
        f"as sglang-h100-prefill, {k}K vs 4K prompts", "prefill", "16,384 tokens per GPU", prompt, None, "FP8 W8A8",
        f"throughput ratio {k}K / 4K prompts", round(node_tps / 50302, 4), "-",
        f"LMSYS 96xH100 blog, prefill phase: {node_tps:,} vs 50,302 tok/s per node [D: {node_tps:,} / 50,302]", False,
        _ratio(_prefill, "h100-cluster:4", "prompt_len", prompt, 4096, devices=32, ep=32, tokens_per_device=16384,
               quant="fp8", microbatches=2))


POINTS: tuple[Point, ...] = (
    Point("cmi-decode-50ms", "deepseek-v3", "DeepSeek-R1", "Ascend 910C", "cloudmatrix384", 160,
          "EP320, attention DP320 (TP1 per die), MTP 1 @ 70%, 2 microbatches", "decode", "96 per NPU", 4096, None,
          "INT8 W8A8, BF16 KV", "tokens/s per NPU", 1943.0, "TPOT 49.4 ms",
          "CMI abstract + Table 3", True,
          _decode("cloudmatrix384", batch_per_device=96, microbatches=2, **_CMI_DECODE)),
    Point("cmi-prefill", "deepseek-v3", "DeepSeek-R1", "Ascend 910C", "cloudmatrix384", 16,
          "EP32, 2 microbatches, perfect expert balance", "prefill", "16,384 tokens per NPU", 4096, None,
          "INT8 W8A8", "prompt tokens/s per NPU", 6688.0, "-", "CMI abstract + Table 2", True,
          _prefill("cloudmatrix384", devices=16, ep=32, prompt_len=4096, tokens_per_device=16384, quant="int8",
                   microbatches=2)),
    Point("cmi-decode-15ms", "deepseek-v3", "DeepSeek-R1", "Ascend 910C", "cloudmatrix384", 160,
          "as cmi-decode-50ms (deployment of §3 assumed); batch solved for the SLO", "decode",
          "~8 per NPU [D: 538 x 0.015]", 4096, None, "INT8 W8A8, BF16 KV", "tokens/s per NPU", 538.0,
          "TPOT <= 15 ms", "CMI abstract", True, _under_tpot("cloudmatrix384", 15.0, **_CMI_DECODE)),
    Point("cmi-mb-gain-b64", "deepseek-v3", "DeepSeek-R1", "Ascend 910C", "cloudmatrix384", 160,
          "as cmi-decode-50ms, 2 vs 1 microbatches", "decode", "64 per NPU", 4096, None, "INT8 W8A8",
          "throughput ratio 2 mb / 1 mb", 1.058, "-", "CMI §3 microbatching ablation [S]", False,
          _ratio(_decode, "cloudmatrix384", "microbatches", 2, 1, batch_per_device=64, **_CMI_DECODE)),
    Point("cmi-mb-gain-b96", "deepseek-v3", "DeepSeek-R1", "Ascend 910C", "cloudmatrix384", 160,
          "as cmi-decode-50ms, 2 vs 1 microbatches", "decode", "96 per NPU", 4096, None, "INT8 W8A8",
          "throughput ratio 2 mb / 1 mb", 1.094, "-", "CMI §3 microbatching ablation [S]", False,
          _ratio(_decode, "cloudmatrix384", "microbatches", 2, 1, batch_per_device=96, **_CMI_DECODE)),
    Point("cmi-mb-gain-b128", "deepseek-v3", "DeepSeek-R1", "Ascend 910C", "cloudmatrix384", 160,
          "as cmi-decode-50ms, 2 vs 1 microbatches", "decode", "128 per NPU", 4096, None, "INT8 W8A8",
          "throughput ratio 2 mb / 1 mb", 1.069, "-", "CMI §3 microbatching ablation [S]", False,
          _ratio(_decode, "cloudmatrix384", "microbatches", 2, 1, batch_per_device=128, **_CMI_DECODE)),
    Point("cmi-prefill-mb-gain", "deepseek-v3", "DeepSeek-R1", "Ascend 910C", "cloudmatrix384", 16,
          "as cmi-prefill, 2 vs 1 microbatches", "prefill", "16,384 tokens per NPU", 4096, None, "INT8 W8A8",
          "throughput ratio 2 mb / 1 mb", 1.27, "-",
          "CMI §3 microbatching ablation [S]: +23 to +31%; 1.27 is the midpoint "
          "[D: (1.23 + 1.31) / 2]", False,
          _ratio(_prefill, "cloudmatrix384", "microbatches", 2, 1, devices=16, ep=32, prompt_len=4096,
                 tokens_per_device=16384, quant="int8")),
    Point("step3-dsv3-hopper", "deepseek-v3", "DeepSeek-V3", "H800 SXM (Hopper)", "h800-cluster:40", 320,
          "not in the abstract: EP320 over 320 GPUs (DSV3 §3.4 decode unit), attention DP or TP4 (DSV3 §3.4), "
          "whichever predicts more; no MTP; batch solved for the SLO",
          "decode", "~116 per GPU [D: 2,324 x 0.05]", 4096, None, "FP8", "tokens/s per GPU", 2324.0,
          "TPOT <= 50 ms", "Step-3 (arXiv 2507.19427) abstract", False,
          _best_of(_under_tpot("h800-cluster:40", 50.0, devices=320, ep=320, attn_tp=4, kv_len=4096, quant="fp8"),
                   _under_tpot("h800-cluster:40", 50.0, devices=320, ep=320, attn_tp=1, kv_len=4096, quant="fp8"))),
    # SGLang on 12 x 8 H100 (LMSYS blog "Deploying DeepSeek with PD Disaggregation and Large-scale Expert
    # Parallelism on 96 H100 GPUs", 2025-05-05, "Overall Throughput" tables): DP attention, DeepEP, DeepGEMM,
    # two-batch overlap (2 microbatches), PD-disaggregated.
    Point("sglang-h100-prefill", "deepseek-v3", "DeepSeek-V3", "H100 SXM (Hopper)", "h100-cluster:4", 32,
          "EP32 (4 nodes), attention DP32, two-batch overlap, simulated perfect EPLB", "prefill",
          "16,384 tokens per GPU", 4096, None, "FP8 W8A8", "prompt tokens/s per GPU", 7417.0, "-",
          "LMSYS 96xH100 blog, prefill table: 59,337 tok/s per node with simulated perfect EPLB "
          "[D: 59,337 / 8 GPUs]", False,
          _prefill("h100-cluster:4", devices=32, ep=32, prompt_len=4096, tokens_per_device=16384, quant="fp8",
                   microbatches=2)),
    Point("deepseek-profile-prefill", "deepseek-v3", "DeepSeek-V3", "H800 SXM (Hopper)", "h800-cluster:4", 32,
          "EP32 (4 nodes, DSV3 §3.4 prefill unit), attention DP32, two-batch overlap", "prefill",
          "16,384 tokens per GPU", 4096, None, "FP8 W8A8", "prompt tokens/s per GPU", 7839.0, "-",
          "LMSYS 96xH100 blog, prefill table, 'DeepSeek Profile' column (DeepSeek's published profile data): "
          "62,713 tok/s per node [D: 62,713 / 8 GPUs]", False,
          _prefill("h800-cluster:4", devices=32, ep=32, prompt_len=4096, tokens_per_device=16384, quant="fp8",
                   microbatches=2)),
    Point("sglang-h100-decode", "deepseek-v3", "DeepSeek-V3", "H100 SXM (Hopper)", "h100-cluster:9", 72,
          "EP72 (9 nodes, 256 routed + 32 redundant = 288 slots, 4 per GPU), attention DP72, two-batch overlap",
          "decode", "256 per GPU", 2000, 100, "FP8 W8A8, BF16 KV", "tokens/s per GPU", 2785.0,
          "TPOT ~92 ms [D: 256 / 2,785]",
          "LMSYS 96xH100 blog, decode table: 22,282 tok/s per node, batch 256, KV 2,000 [D: 22,282 / 8]", False,
          _decode("h100-cluster:9", batch_per_device=256, microbatches=2, **_SGLANG_H100_DECODE)),
    # The same 96xH100 blog's ablations ("Ablation Study: Two-batch Overlap", "Prefill Phase"): gains and
    # ratios of one deployment, so the unpublished expert imbalance cancels. Not used: the "simulated MTP"
    # runs (dummy kernels slow attention on purpose) and DeepSeek's production average (not a steady state).
    Point("sglang-h100-tbo-gain-b256", "deepseek-v3", "DeepSeek-V3", "H100 SXM (Hopper)", "h100-cluster:9", 72,
          "as sglang-h100-decode, two-batch overlap vs none", "decode", "256 per GPU", 2000, 100, "FP8 W8A8",
          "throughput ratio 2 mb / 1 mb", 1.255, "-", "LMSYS 96xH100 blog, TBO ablation: +25.5% at 256 tokens",
          False, _ratio(_decode, "h100-cluster:9", "microbatches", 2, 1, batch_per_device=256, **_SGLANG_H100_DECODE)),
    Point("sglang-h100-tbo-gain-b32", "deepseek-v3", "DeepSeek-V3", "H100 SXM (Hopper)", "h100-cluster:9", 72,
          "as sglang-h100-decode, two-batch overlap vs none", "decode", "32 per GPU", 2000, 100, "FP8 W8A8",
          "throughput ratio 2 mb / 1 mb", 0.73, "-", "LMSYS 96xH100 blog, TBO ablation: -27% at 32 tokens/device",
          False, _ratio(_decode, "h100-cluster:9", "microbatches", 2, 1, batch_per_device=32, **_SGLANG_H100_DECODE)),
    Point("sglang-h100-prefill-tbo-gain", "deepseek-v3", "DeepSeek-V3", "H100 SXM (Hopper)", "h100-cluster:4", 32,
          "as sglang-h100-prefill at 8,192 tokens per GPU (no-TBO OOMs at 16,384), TBO vs none", "prefill",
          "8,192 tokens per GPU", 4096, None, "FP8 W8A8", "throughput ratio 2 mb / 1 mb", 1.31, "-",
          "LMSYS 96xH100 blog, TBO ablation: +27% to +35% at the same tokens per device; 1.31 is the midpoint "
          "[D: (1.27 + 1.35) / 2]", False,
          _ratio(_prefill, "h100-cluster:4", "microbatches", 2, 1, devices=32, ep=32, prompt_len=4096,
                 tokens_per_device=8192, quant="fp8")),
    _prefill_vs_4k(1024, 57674), _prefill_vs_4k(2048, 54543),
    # SGLang MTP blog (LMSYS "Accelerating SGLang with Multiple Token Prediction", 2025-07-17), case study 1:
    # the latency-bound small-batch point (no MTP, overlap scheduling on).
    Point("sglang-h200-small-batch", "deepseek-v3", "DeepSeek-V3", "H200 SXM (Hopper)", "h200-cluster:2", 16,
          "2 decode nodes; layout not published: EP16 with attention DP16, or attention TP8, whichever "
          "predicts more", "decode", "2 per GPU", 65536, 4096, "FP8 W8A8, BF16 KV", "tokens/s per GPU", 60.4,
          "TPOT ~33 ms [D: 2 / 60.4]",
          "LMSYS MTP blog, case study 1: 60.4 tok/s per rank with overlap scheduling, no MTP", False,
          _best_of(_decode("h200-cluster:2", devices=16, ep=16, batch_per_device=2, kv_len=65536 + 2048,
                           quant="fp8"),
                   _decode("h200-cluster:2", devices=16, ep=16, attn_tp=8, batch_per_device=2,
                           kv_len=65536 + 2048, quant="fp8"))),
    # TensorRT-LLM "How to get best performance on DeepSeek-R1 in TensorRT LLM" (NVIDIA/TensorRT-LLM
    # docs/source/blogs/Best_perf_practice_on_DeepSeek-R1_in_TensorRT-LLM.md): trtllm-bench max-throughput,
    # in-flight batching (aggregated), attention DP8 + EP8 on one 8-GPU node, ISL 1K / OSL 2K. No run passes
    # --enable_chunked_context (off by default; the guide: MLA chunked context not supported on Hopper), so
    # each prompt runs whole in one step within the run's --max_num_tokens per rank.
    Point("trtllm-h200-maxtput", "deepseek-v3", "DeepSeek-R1", "H200 SXM (Hopper)", "h200-cluster:1", 8,
          "attention DP8 + EP8, aggregated (in-flight batching)", "aggregated", "128 per GPU (concurrency 1,024)",
          1024, 2048, "FP8 W8A8, BF16 KV", "output tokens/s per GPU", 1436.0, "-",
          "TRT-LLM DeepSeek-R1 best-perf guide, 'H200 max-throughput': 1,436.16 tok/s/GPU", False,
          _aggregated("h200-cluster:1", 1024, 2048, max_num_tokens=1151, chunked=False, devices=8, ep=8,
                      batch_per_device=128, kv_len=2048, quant="fp8")),
    Point("trtllm-b200-maxtput", "deepseek-v3", "DeepSeek-R1", "B200 (Blackwell)", "b200-cluster:1", 8,
          "attention DP8 + EP8, aggregated (in-flight batching)", "aggregated", "384 per GPU (concurrency 3,072)",
          1024, 2048, "NVFP4 experts, BF16 KV", "output tokens/s per GPU", 4548.0, "-",
          "TRT-LLM DeepSeek-R1 best-perf guide, 'B200 max-throughput for R1 with FP16 KV cache': "
          "4,548.01 tok/s/GPU", False,
          _aggregated("b200-cluster:1", 1024, 2048, max_num_tokens=1536, chunked=False, devices=8, ep=8,
                      batch_per_device=384, kv_len=2048, quant="nvfp4")),
    Point("trtllm-b200-maxtput-fp8kv", "deepseek-v3", "DeepSeek-R1", "B200 (Blackwell)", "b200-cluster:1", 8,
          "attention DP8 + EP8, aggregated (in-flight batching)", "aggregated", "896 per GPU (concurrency 7,168)",
          1024, 2048, "NVFP4 experts, FP8 KV", "output tokens/s per GPU", 5393.0, "-",
          "TRT-LLM DeepSeek-R1 best-perf guide, 'B200 max-throughput for R1-0528 with FP8 KV cache': "
          "5,393.28 tok/s/GPU", False,
          _aggregated("b200-cluster:1", 1024, 2048, max_num_tokens=2048, chunked=False, devices=8, ep=8,
                      batch_per_device=896, kv_len=2048, quant="nvfp4", kv_dtype="fp8")),
    # SGLang on GB200 NVL72 (LMSYS "Deploying DeepSeek on GB200 NVL72 with PD and Large Scale EP (Part II)",
    # 2025-09-25): decode on 48 ranks of one NVL72 rack, FP8 attention (FP8 KV cache) and NVFP4 MoE,
    # fine-grained combine overlap instead of two-batch overlap (1 microbatch here).
    Point("sglang-gb200-decode", "deepseek-v3", "DeepSeek-V3", "GB200 (Blackwell)", "gb200-nvl72:1", 48,
          "EP48 (256 routed + 32 redundant, 6 slots per GPU), attention DP48, one NVLink domain", "decode",
          "1,408 per GPU (the blog: batch chosen to fill the KV cache, 1,408 at 2K ISL)", 2000, 100,
          "NVFP4 experts, FP8 KV", "tokens/s per GPU", 13386.0, "-",
          "LMSYS GB200 Part II blog: 13,386 output tok/s per GPU with FP8 attention + NVFP4 MoE, 2,000-token "
          "inputs", False,
          _decode("gb200-nvl72:1", devices=48, ep=48, batch_per_device=1408, kv_len=2050, quant="nvfp4",
                  kv_dtype="fp8")),
    # Kimi K2 on 128 H200 (LMSYS "Deploying Kimi K2 with PD Disaggregation and Large-Scale Expert Parallelism
    # on 128 H200 GPUs", 2025-07-20): 1P1D, 4 prefill + 12 decode nodes, 96 redundant experts on decode.
    Point("sglang-kimi-k2-decode", "kimi-k2", "Kimi K2", "H200 SXM (Hopper)", "h200-cluster:12", 96,
          "EP96 (384 routed + 96 redundant = 480 slots, 5 per GPU), attention DP96; microbatching not "
          "published: 1 or 2, whichever predicts more", "decode", "480 per GPU (decode batch size)", 2000, 100,
          "FP8 (block-scaled), BF16 KV", "tokens/s per GPU", 4000.0, "TPOT ~120 ms [D: 480 / 4,000]",
          "LMSYS Kimi K2 blog: decode 384k tok/s on the 12 decode nodes [D: 384,000 / 96 GPUs]", False,
          _best_of(_decode("h200-cluster:12", devices=96, ep=96, redundant_experts=96, batch_per_device=480,
                           kv_len=2050, quant="fp8"),
                   _decode("h200-cluster:12", devices=96, ep=96, redundant_experts=96, batch_per_device=480,
                           kv_len=2050, quant="fp8", microbatches=2))),
)


def rows(points: tuple[Point, ...] = POINTS) -> list[dict]:
    """Predicted, published and relative error of every point."""
    from planner.frontend.trace import model_shape

    shapes: dict[str, ModelShape] = {}
    out = []
    for p in points:
        shape = shapes.setdefault(p.model, model_shape(p.model))
        pred = p.predict(shape)
        row = {k: v for k, v in dataclasses.asdict(p).items() if k != "predict"}
        row.update(predicted=pred, error=(pred - p.published) / p.published)
        out.append(row)
    return out


def summary(table: list[dict]) -> dict:
    """Median and worst |error| over the held-out points, and the counts."""
    held = [abs(r["error"]) for r in table if not r["calibration"]]
    return {
        "points": len(table), "calibration": sum(r["calibration"] for r in table), "held_out": len(held),
        "hardware": sorted({r["hardware"] for r in table}), "models": sorted({r["served"] for r in table}),
        "median_abs_error": statistics.median(held) if held else None, "worst_abs_error": max(held, default=None),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    table = rows()
    s = summary(table)
    if args.json:
        print(json.dumps({"rows": table, "summary": s}, indent=2, sort_keys=True))
        return 0
    w = max(len(r["name"]) for r in table) + 2
    print(f"{'point':<{w}}{'hardware':<20}{'metric':<30}{'published':>10}{'predicted':>11}{'error':>9}  use")
    for r in table:
        print(f"{r['name']:<{w}}{r['hardware']:<20}{r['metric']:<30}{r['published']:>10.3f}{r['predicted']:>11.3f}"
              f"{r['error']:>+9.1%}  {'calibration' if r['calibration'] else 'held out'}")
    print(f"\n{s['points']} points ({s['calibration']} calibration, {s['held_out']} held out) on "
          f"{len(s['hardware'])} hardware types, {len(s['models'])} models")
    if s["median_abs_error"] is not None:
        print(f"held out: median |error| {s['median_abs_error']:.1%}, worst {s['worst_abs_error']:.1%} "
              f"(target: median <= 10%, none > 25%)")
    for r in table:
        print(f"  {r['name']}: {r['served']}, {r['devices']} x {r['hardware']}, {r['parallelism']}; {r['phase']}, "
              f"batch {r['batch']}, in {r['input_len']}, out {r['output_len'] or '-'}, {r['precision']}, {r['latency']}; source: {r['source']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
