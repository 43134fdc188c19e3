"""`podplan profile [-o FILE] [--quick]`: measure this GPU host into a hardware profile the cost model reads.

Measures what costmodels/serving.py prices: dense GEMM and grouped GEMM (torch._grouped_mm; FP8:
torch._scaled_grouped_mm) across
token counts and weight shapes, FP8 GEMM where the GPU has it, attention (SDPA, and MLA-style
absorbed decode as two batched GEMMs) across batch and KV length, HBM bandwidth (a large
device-to-device copy), the per-kernel launch cost, and NCCL all-reduce / all-to-all across every
GPU of the host when it has two or more. The JSON format is docs/profile.md; the loader is
costmodels/profiles.py. Every measurement function takes a `device` so tests run them on CPU at
tiny sizes; the command itself needs CUDA.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROFILE_FORMAT = "podplan-hardware-profile"
PROFILE_VERSION = 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="measure this CUDA host (GEMM, grouped GEMM, attention, HBM, NCCL) into a "
                                       "hardware profile JSON for the cost model")
    p.add_argument("-o", "--output", default=None,
                   help="where to write the profile (default: profile-<key>.json in the current folder; the cost "
                        "model reads costmodels/profiles/<key>.json, key as in costmodels/hardware.py: h200, ...)")
    p.add_argument("--quick", action="store_true", help="fewer shapes and repetitions (well under 2 minutes)")
    p.set_defaults(func=run)


# --- timing ------------------------------------------------------------------------------------------


def _sync(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_us(fn: Callable[[], object], device: Any, *, warmup: int = 3, reps: int = 10) -> float:
    """Median wall time of `fn` in microseconds, the device synchronised around each call batch.

    Runs `reps` calls between two synchronisations (so launch gaps overlap as in a real step) three
    times and keeps the median of the three means: robust to one slow batch.
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    means = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        _sync(device)
        means.append((time.perf_counter() - t0) / reps * 1e6)
    return sorted(means)[1]


# --- measurements (each returns JSON-ready rows; `device` is a torch device or its name) ------------


def measure_gemm(device: Any, shapes: list[tuple[int, int, int]], dtype: str = "bf16", reps: int = 10) -> list[dict]:
    """[M, K] x [K, N] matmuls: M is tokens, K x N the weight. fp8 uses torch._scaled_mm (row-major A,
    column-major B, unit scales), as FP8 serving kernels do; rows that fail carry an "error"."""
    import torch

    rows = []
    for m, n, k in shapes:
        row: dict[str, Any] = {"dtype": dtype, "m": m, "n": n, "k": k}
        try:
            if dtype == "fp8":
                a = torch.randn(m, k, device=device).to(torch.float8_e4m3fn)
                b = torch.randn(n, k, device=device).to(torch.float8_e4m3fn).t()
                one = torch.ones((), device=device)

                def fn(a: Any = a, b: Any = b, one: Any = one) -> object:
                    return torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
            else:
                tdt = torch.bfloat16 if dtype == "bf16" else torch.float32
                a = torch.randn(m, k, device=device, dtype=tdt)
                b = torch.randn(k, n, device=device, dtype=tdt)

                def fn(a: Any = a, b: Any = b, one: Any = None) -> object:
                    return a @ b
            us = time_us(fn, device, reps=reps)
            row.update(us=us, tflops=2.0 * m * n * k / us / 1e6)
        except Exception as exc:  # an unsupported shape/dtype on this device is a result, not a crash
            row["error"] = _error(exc)
        rows.append(row)
    return rows


def measure_grouped_gemm(device: Any, cases: list[tuple[int, int, int, int]], dtype: str = "bf16",
                         reps: int = 10) -> list[dict]:
    """Grouped GEMMs (MoE experts): `groups` experts each getting `tokens` tokens, weights [K, N] each.

    bf16: torch._grouped_mm with a 2-D activation and 3-D weights (offsets per group), the kernel MoE
    engines call; where it fails the row records the error and a per-expert loop of matmuls instead
    (impl "loop"), so the profile still has a number. fp8: torch._scaled_grouped_mm with row-wise
    scales (FP8 activations per token, FP8 weights per output channel), the FP8 MoE path of torch;
    a row it cannot run keeps an "error" and no timing (an FP8 loop would time a different kernel).
    """
    import torch

    rows = []
    for groups, tokens, n, k in cases:
        row: dict[str, Any] = {"dtype": dtype, "groups": groups, "tokens_per_group": tokens, "n": n, "k": k}
        offs = torch.arange(tokens, groups * tokens + 1, tokens, device=device, dtype=torch.int32)
        try:
            if dtype == "fp8":
                a = torch.randn(groups * tokens, k, device=device).to(torch.float8_e4m3fn)
                w = torch.randn(groups, n, k, device=device).to(torch.float8_e4m3fn).transpose(-2, -1)
                sa = torch.ones(groups * tokens, device=device, dtype=torch.float32)
                sb = torch.ones(groups, n, device=device, dtype=torch.float32)
                fn: Callable[[], object] = lambda: torch._scaled_grouped_mm(
                    a, w, sa, sb, offs=offs, out_dtype=torch.bfloat16)
                fn()
                row["impl"] = "torch._scaled_grouped_mm"
            else:
                a = torch.randn(groups * tokens, k, device=device, dtype=torch.bfloat16)
                w = torch.randn(groups, n, k, device=device, dtype=torch.bfloat16).transpose(-2, -1)  # [G, K, N]
                try:
                    fn = lambda: torch._grouped_mm(a, w, offs=offs)
                    fn()
                    row["impl"] = "torch._grouped_mm"
                except Exception as exc:
                    row["grouped_mm_error"] = _error(exc)
                    chunks = a.split(tokens)
                    fn = lambda: [c @ w[g] for g, c in enumerate(chunks)]
                    row["impl"] = "loop"
        except Exception as exc:  # an FP8 path this device or torch lacks is a result, not a crash
            row["error"] = _error(exc)
            rows.append(row)
            continue
        us = time_us(fn, device, reps=reps)
        flops = 2.0 * groups * tokens * n * k
        weight_bytes = groups * n * k * (1.0 if dtype == "fp8" else 2.0)
        row.update(us=us, tflops=flops / us / 1e6, weight_tbps=weight_bytes / us / 1e6)
        rows.append(row)
    return rows


def _error(exc: BaseException, width: int = 200) -> str:
    """One line naming a failed measurement's exception: what a row keeps instead of a timing."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:width] if str(exc) else ''}"


def measure_podplan_experts(device: Any, cases: list[tuple[int, int, int, int]], top_k: int = 8,
                            reps: int = 10) -> list[dict]:
    """podplan's own routed-experts kernel (`runtime.moe_triton`, BF16, what `podplan run` executes on a GPU):
    `experts` experts of hidden H and intermediate I, each getting `tokens` rows of `top_k`-way routing.

    Token i routes to experts (i x top_k + j) mod experts, j < top_k: every expert gets exactly `tokens`
    rows. `weight_tbps` counts gate, up and down weights of every expert once, as bench/moe_kernels.py
    does. Needs CUDA and Triton; where either is missing each row keeps an "error"."""
    import types

    import torch

    rows = []
    for experts, hidden, inter, tokens in cases:
        row: dict[str, Any] = {"impl": "runtime.moe_triton", "dtype": "bf16", "experts": experts, "hidden": hidden,
                               "intermediate": inter, "top_k": top_k, "tokens_per_expert": tokens}
        try:
            from runtime import moe_triton

            n_tok = experts * tokens // top_k
            mod = types.SimpleNamespace(
                num_experts=experts, hidden_dim=hidden, intermediate_dim=inter, is_transposed=False,
                _podplan_triton=True,  # the shapes are on the kernels' tile grid; skip transformers' probe
                gate_up_proj=torch.randn(experts, 2 * inter, hidden, device=device, dtype=torch.bfloat16),
                down_proj=torch.randn(experts, hidden, inter, device=device, dtype=torch.bfloat16))
            x = torch.randn(n_tok, hidden, device=device, dtype=torch.bfloat16)
            ids = ((torch.arange(n_tok, device=device)[:, None] * top_k + torch.arange(top_k, device=device))
                   % experts).to(torch.int64)
            w = torch.full((n_tok, top_k), 1.0 / top_k, device=device, dtype=torch.float32)
            fn: Callable[[], object] = lambda: moe_triton.triton_experts_forward(mod, x, ids, w)
            fn()
        except Exception as exc:  # no CUDA or no Triton here: a result, not a crash
            row["error"] = _error(exc)
            rows.append(row)
            continue
        us = time_us(fn, device, reps=reps)
        weight_bytes = experts * 3.0 * hidden * inter * 2.0
        row.update(us=us, tflops=2.0 * 3 * experts * tokens * hidden * inter / us / 1e6,
                   weight_tbps=weight_bytes / us / 1e6)
        rows.append(row)
    return rows


def measure_attention(device: Any, cases: list[dict], reps: int = 10) -> list[dict]:
    """Attention cores. kind "sdpa": scaled_dot_product_attention (GQA via enable_gqa), q_len 1 for decode
    or q_len = kv_len (causal) for prefill; kind "mla_decode": absorbed MLA decode as two batched GEMMs
    over the shared latent (scores against 512+64, values against 512), BF16."""
    import torch
    import torch.nn.functional as F

    rows = []
    for case in cases:
        row: dict[str, Any] = dict(case)
        b, h, q, kv = case["batch"], case["heads"], case["q_len"], case["kv_len"]
        try:
            if case["kind"] == "sdpa":
                kvh, d = case["kv_heads"], case["head_dim"]
                qt = torch.randn(b, h, q, d, device=device, dtype=torch.bfloat16)
                kt = torch.randn(b, kvh, kv, d, device=device, dtype=torch.bfloat16)
                vt = torch.randn(b, kvh, kv, d, device=device, dtype=torch.bfloat16)
                causal = q > 1
                fn: Callable[[], object] = lambda: F.scaled_dot_product_attention(
                    qt, kt, vt, is_causal=causal, enable_gqa=kvh != h)
                keys = kv * (q + 1) / 2 if causal else kv * q  # attended (query, key) pairs per head
                flops = 4.0 * b * h * keys * d
                nbytes = 2.0 * b * kvh * kv * d * 2 + 2.0 * 2 * b * h * q * d
            else:  # mla_decode
                lat, rope = case["latent"], case["rope"]
                qt = torch.randn(b, h * q, lat + rope, device=device, dtype=torch.bfloat16)
                cache = torch.randn(b, kv, lat + rope, device=device, dtype=torch.bfloat16)
                scale = (lat + rope) ** -0.5

                def fn() -> object:
                    p = torch.softmax(torch.bmm(qt, cache.transpose(1, 2)) * scale, dim=-1)
                    return torch.bmm(p, cache[..., :lat])

                flops = 2.0 * b * h * q * kv * (2 * lat + rope)
                nbytes = 2.0 * b * kv * (lat + rope)
            us = time_us(fn, device, reps=reps)
            row.update(us=us, tflops=flops / us / 1e6, kv_tbps=nbytes / us / 1e6)
        except Exception as exc:
            row["error"] = _error(exc)
        rows.append(row)
    return rows


def measure_hbm(device: Any, nbytes: int, reps: int = 10) -> dict:
    """Device memory bandwidth: dst.copy_(src) of `nbytes` reads and writes 2 x nbytes."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us = time_us(lambda: dst.copy_(src), device, reps=reps)
    return {"bytes": nbytes, "us": us, "tbps": 2.0 * nbytes / us / 1e6}


def measure_launch(device: Any, reps: int = 200) -> dict:
    """Per-kernel cost of a tiny op issued back to back from Python (eager launch + framework dispatch)."""
    import torch

    x = torch.zeros(1, device=device)
    us = time_us(lambda: x.add_(1.0), device, warmup=20, reps=reps)
    return {"op": "x.add_(1) on one element, eager", "us": us}


# --- collectives (one process per GPU) ----------------------------------------------------------------


def _collective_worker(rank: int, world: int, backend: str, device_type: str, init_file: str, sizes: list[int],
                       reps: int, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
    rows: dict[str, list[dict]] = {"all_reduce": [], "all_to_all": []}
    for nbytes in sizes:
        n = max(world, nbytes // 2 // world * world)  # bf16 elements, divisible by the world
        x = torch.ones(n, dtype=torch.bfloat16, device=device)
        y = torch.empty_like(x)
        for op, fn in (("all_reduce", lambda: dist.all_reduce(x)),
                       ("all_to_all", lambda: dist.all_to_all_single(y, x))):
            dist.barrier()
            us = time_us(fn, device, warmup=2, reps=reps)
            size = n * 2
            # bus bandwidth as nccl-tests defines it: all-reduce 2(w-1)/w x size / t, all-to-all (w-1)/w x size / t
            factor = 2.0 * (world - 1) / world if op == "all_reduce" else (world - 1) / world
            rows[op].append({"bytes": size, "us": us, "algbw_gbps": size / us / 1e3,
                             "busbw_gbps": factor * size / us / 1e3})
    if rank == 0:
        Path(out_dir, "collectives.json").write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def measure_collectives(world: int, sizes: list[int], *, backend: str = "nccl", device_type: str = "cuda",
                        reps: int = 10) -> dict:
    """All-reduce and all-to-all of each size (bytes per rank) across `world` processes, one per device."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_collective_worker, args=(world, backend, device_type, init_file, sizes, reps, tmp),
                 nprocs=world, join=True)
        rows = json.loads(Path(tmp, "collectives.json").read_text())
    return {"world": world, "backend": backend, **rows}


# --- the plan of measurements ------------------------------------------------------------------------


def plan(quick: bool, tiny: bool = False) -> dict[str, Any]:
    """Shapes to measure. Weight shapes are the ones the bundled models run (DeepSeek-V3 hidden 7,168,
    expert intermediate 2,048; attention projections; Qwen3/gpt-oss expert sizes); token counts span
    decode (1..256) to prefill (4k..16k). `tiny` is for CPU tests only."""
    if tiny:
        return {"gemm": [(4, 32, 64), (64, 32, 64)], "grouped": [(2, 4, 32, 64), (2, 16, 32, 64)],
                "attention": [{"kind": "sdpa", "batch": 2, "heads": 4, "kv_heads": 2, "head_dim": 16, "q_len": 1,
                               "kv_len": 32},
                              {"kind": "sdpa", "batch": 1, "heads": 4, "kv_heads": 4, "head_dim": 16, "q_len": 32,
                               "kv_len": 32},
                              {"kind": "mla_decode", "batch": 2, "heads": 4, "q_len": 1, "kv_len": 32, "latent": 32,
                               "rope": 8}],
                "hbm": 1 << 20, "collective_sizes": [1 << 10, 1 << 14], "reps": 2, "fp8": False}
    tokens = [1, 16, 128, 1024, 8192] if quick else [1, 4, 16, 64, 128, 256, 512, 1024, 4096, 16384]
    weights = [(4096, 7168), (7168, 2048)] if quick else [(4096, 7168), (7168, 2048), (24576, 1536),
                                                          (7168, 18432), (2880, 2880)]
    per_expert = [1, 8, 32, 128, 512] if quick else [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]
    expert_shapes = [(4096, 7168), (7168, 2048)] if quick else [(4096, 7168), (7168, 2048), (3072, 4096),
                                                               (5760, 2880)]
    batches = [1, 16, 64] if quick else [1, 4, 16, 32, 64, 128]
    kv_lens = [1024, 4096] if quick else [512, 1024, 2048, 4096, 8192, 16384]
    attention: list[dict] = []
    for b in batches:
        for kv in kv_lens:
            attention.append({"kind": "mla_decode", "batch": b, "heads": 128, "q_len": 1, "kv_len": kv,
                              "latent": 512, "rope": 64})
            attention.append({"kind": "sdpa", "batch": b, "heads": 64, "kv_heads": 8, "head_dim": 128, "q_len": 1,
                              "kv_len": kv})
    for s in ([4096] if quick else [1024, 4096, 8192]):
        attention.append({"kind": "sdpa", "batch": 1, "heads": 64, "kv_heads": 8, "head_dim": 128, "q_len": s,
                          "kv_len": s})
        attention.append({"kind": "sdpa", "batch": 1, "heads": 128, "kv_heads": 128, "head_dim": 192 if not quick
                          else 128, "q_len": s, "kv_len": s})
    # podplan's kernel at two expert sizes, DeepSeek-V3's (7,168 x 2,048, 88 MB in BF16) and Qwen3-30B-A3B's
    # (2,048 x 768, 9.4 MB, 128 of them): small experts give each tile less work and stream slower
    podplan = [(e, h, i, t) for e, h, i in ((32, 7168, 2048), (128, 2048, 768))
               for t in ([1, 8, 32, 128] if quick else [1, 2, 4, 8, 16, 32, 64, 128])]
    return {
        "podplan_experts": podplan,
        "gemm": [(m, n, k) for n, k in weights for m in tokens],
        "grouped": [(8 if quick else 32, t, n, k) for n, k in expert_shapes for t in per_expert],
        "attention": attention,
        "hbm": (1 << 30) if quick else (4 << 30),
        "collective_sizes": [1 << s for s in ((12, 16, 20, 24, 28) if quick else range(10, 30, 2))],
        "reps": 5 if quick else 20,
        "fp8": True,
    }


def environment(device: Any) -> dict[str, Any]:
    """What the numbers were measured on: device name, count, driver, CUDA, torch, host OS."""
    import torch

    dev = torch.device(device)
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                            "os": f"{platform.system()} {platform.release()}", "device_type": dev.type}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info.update(name=props.name, count=torch.cuda.device_count(), memory_gb=props.total_memory / 1e9,
                    capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count,
                    cuda=torch.version.cuda, driver=_driver_version())
    else:
        info.update(name=f"CPU ({platform.processor() or platform.machine()})", count=1, driver=None, cuda=None)
    return info


def _driver_version() -> str | None:
    try:
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def collect(device: Any, *, quick: bool, tiny: bool = False, log: Callable[[str], None] = lambda s: None,
            collectives: bool | None = None) -> dict[str, Any]:
    """Run every measurement of `plan(quick, tiny)` on `device`; returns the profile document."""
    import torch

    t0 = time.perf_counter()
    p = plan(quick, tiny)
    reps = p["reps"]
    env = environment(device)
    m: dict[str, Any] = {}
    log("launch overhead")
    m["launch"] = measure_launch(device, reps=max(20, reps * 10))
    log("HBM bandwidth")
    m["hbm"] = measure_hbm(device, p["hbm"], reps=reps)
    log(f"GEMM bf16 ({len(p['gemm'])} shapes)")
    m["gemm"] = measure_gemm(device, p["gemm"], "bf16" if not tiny else "fp32", reps=reps)
    fp8 = p["fp8"] and torch.device(device).type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
    if fp8:
        log(f"GEMM fp8 ({len(p['gemm'])} shapes)")
        m["gemm"] += measure_gemm(device, p["gemm"], "fp8", reps=reps)
    log(f"grouped GEMM ({len(p['grouped'])} cases)")
    m["grouped_gemm"] = measure_grouped_gemm(device, p["grouped"], "bf16", reps=reps)
    if fp8:
        log(f"grouped GEMM fp8 ({len(p['grouped'])} cases)")
        m["grouped_gemm"] += measure_grouped_gemm(device, p["grouped"], "fp8", reps=reps)
    if p.get("podplan_experts") and torch.device(device).type == "cuda":
        log(f"podplan experts kernel ({len(p['podplan_experts'])} cases)")
        m["podplan_experts"] = measure_podplan_experts(device, p["podplan_experts"], reps=reps)
    log(f"attention ({len(p['attention'])} cases)")
    m["attention"] = measure_attention(device, p["attention"], reps=reps)
    count = env.get("count", 1)
    if collectives is None:
        collectives = torch.device(device).type == "cuda" and count >= 2
    if collectives:
        world = min(count, 8)
        log(f"NCCL all-reduce / all-to-all over {world} GPUs")
        try:
            m["collectives"] = measure_collectives(world, p["collective_sizes"], reps=reps)
        except Exception as exc:  # a broken NCCL setup should not lose the single-GPU numbers
            m["collectives"] = {"error": _error(exc, 300)}
    return {
        "format": PROFILE_FORMAT,
        "version": PROFILE_VERSION,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": env,
        "quick": quick,
        "seconds": round(time.perf_counter() - t0, 1),
        "measurements": m,
    }


def hardware_key(device_name: str) -> str | None:
    """The costmodels.hardware device key a CUDA device name belongs to ("NVIDIA H200" -> "h200"), or None."""
    from costmodels.hardware import DEVICES

    flat = device_name.lower().replace(" ", "").replace("-", "")
    for key in sorted(DEVICES, key=len, reverse=True):  # gb200 before b200
        if key != "cpu" and key.replace("-", "") in flat:
            return key
    return None


def summary(doc: dict[str, Any]) -> list[str]:
    """Headline figures of a profile, one line each, beside the spec sheet where the device is known."""
    from costmodels.hardware import DEVICES
    from costmodels.profiles import SMALL_GROUP_TOKENS, profile_from_doc

    m = doc["measurements"]
    prof = profile_from_doc(doc, "summary")  # the rates as the cost model will read them
    key = hardware_key(doc["device"]["name"])
    spec = DEVICES[key] if key else None

    def vs(value: float, peak: float, unit: str) -> str:
        return f" (spec {peak:g} {unit}: {value / peak:.0%})" if spec and peak > 0 else ""

    hbm = m["hbm"]["tbps"]
    lines = [f"{doc['device']['name']}: HBM copy {hbm:.2f} TB/s{vs(hbm, spec.hbm_tbps if spec else 0, 'TB/s')}, "
             f"launch {m['launch']['us']:.1f} us"]
    for dtype in ("bf16", "fp8", "fp32"):
        ok = [r for r in m["gemm"] if r["dtype"] == dtype and "tflops" in r]
        if ok:
            best = max(ok, key=lambda r: r["tflops"])
            peak = spec.peak_tflops_or_zero(dtype) if spec else 0.0
            lines.append(f"GEMM {dtype}: best {best['tflops']:.0f} TFLOPS at {best['m']}x{best['n']}x{best['k']}"
                         f"{vs(best['tflops'], peak, 'TFLOPS')}")
    for dtype in ("bf16", "fp8"):
        ok = [r for r in m["grouped_gemm"] if r.get("dtype", "bf16") == dtype and "tflops" in r]
        if not ok:
            continue
        best = max(ok, key=lambda r: r["tflops"])
        peak = spec.peak_tflops_or_zero(dtype) if spec else 0.0
        lines.append(f"grouped GEMM {dtype}: best {best['tflops']:.0f} TFLOPS at {best['groups']} groups x "
                     f"{best['tokens_per_group']} tokens ({best['impl']}){vs(best['tflops'], peak, 'TFLOPS')}")
        if any(r["tokens_per_group"] <= SMALL_GROUP_TOKENS for r in ok):
            rate = prof.grouped_stream_tbps(dtype) or 0.0
            lines.append(f"grouped GEMM {dtype}: median weight stream {rate:.2f} TB/s at <= {SMALL_GROUP_TOKENS} "
                         f"tokens per group{vs(rate, spec.hbm_tbps if spec else 0, 'TB/s')}")
    for size, rate in prof.podplan_stream_median():
        lines.append(f"podplan experts kernel (runtime.moe_triton, bf16): median weight stream {rate:.2f} TB/s at "
                     f"<= {SMALL_GROUP_TOKENS} tokens per expert, {2 * size / 1e6:.1f} MB experts"
                     f"{vs(rate, spec.hbm_tbps if spec else 0, 'TB/s')}")
    mla = [r for r in m["attention"] if r.get("kind") == "mla_decode" and "kv_tbps" in r]
    if mla:
        best = max(mla, key=lambda r: r["kv_tbps"])
        lines.append(f"MLA decode: best KV read {best['kv_tbps']:.2f} TB/s at batch {best['batch']}, KV {best['kv_len']}"
                     f"{vs(best['kv_tbps'], spec.hbm_tbps if spec else 0, 'TB/s')}")
    col = m.get("collectives")
    if col and col.get("all_reduce"):
        big = col["all_reduce"][-1]
        lines.append(f"all-reduce x{col['world']}: {big['busbw_gbps']:.0f} GB/s bus bandwidth at {big['bytes']} bytes"
                     f"{vs(big['busbw_gbps'], spec.scaleup_gbps if spec else 0, 'GB/s one direction')}")
    return lines


def run(args: argparse.Namespace) -> int:
    from costmodels.errors import InputError
    from planner.ir.fileio import check_output_path, write_atomic

    try:
        import torch
    except ImportError:
        print("podplan profile: error: torch is not installed; install podplan's requirements", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("podplan profile: error: no CUDA device visible; run it on a GPU host (the profile measures the "
              "GPU's kernels)", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(0)
    key = hardware_key(name) or name.lower().replace("nvidia ", "").replace(" ", "-")
    out = check_output_path(args.output or f"profile-{key}.json")
    from planner.cli.console import stderr_console

    console = stderr_console()
    doc = collect("cuda:0", quick=args.quick, log=lambda s: console.log(f"measuring {s}"))
    try:
        write_atomic(out, json.dumps(doc, indent=1, sort_keys=True) + "\n")
    except OSError as exc:
        raise InputError(f"-o {out}: cannot write ({exc.strerror}); choose a writable path") from None
    for line in summary(doc):
        print(line)
    print(f"wrote {out} in {doc['seconds']:.0f} s")
    return 0
