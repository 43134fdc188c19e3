"""Decode and prefill on GPUs: podplan's runtime (NCCL, static buffers, CUDA-graph decode) against
transformers' `generate` and against the rooflines, at several batch sizes.

    .venv/bin/python bench/gpu_decode.py                                 # Qwen3-30B-A3B shape, 1 GPU, batch 8/32/128
    .venv/bin/python bench/gpu_decode.py --model mixtral-8x7b --batches 8,32
    .venv/bin/python bench/gpu_decode.py --attention-gpus 1 --expert-gpus 2 --batches 64   # AFD over 3 GPUs
    .venv/bin/python bench/gpu_decode.py --model tiny-qwen3-moe --batches 4                # a smoke test

The model is the bundled config with seeded random bf16 weights (built on each GPU: identical on
every GPU, though not to a CPU build of the same seed). Baseline: `generate` (greedy, KV cache) of
the same model on GPU 0, eager attention and grouped_mm experts (kept for decoding; --generate-stock lets
transformers switch them to batched_mm); its decode rate is (tokens of a T-token run - tokens of a 1-token run) /
time difference. Runtime: one rank per GPU (colocated: every GPU runs attention and holds experts;
--expert-gpus: attention and experts on different GPUs); TPOT is the mean of the decode steps
replayed from a CUDA graph (the first two decode steps run eagerly), decode tok/s = batch / TPOT.
HBM roofline: a decode step must read every active weight once (attention, norms, head, gates, and
the experts the batch touches: E * (1 - (1 - k/E)^B) per layer under uniform routing) plus the KV
cache; step >= bytes / HBM bandwidth. Compute roofline of prefill: 2 x active parameters x prompt
tokens / dense bf16 peak (attention's quadratic term is left out: it is small at these lengths).
Without CUDA (or with too few GPUs) it exits 2 with one line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-30b-a3b", help="bundled model (default qwen3-30b-a3b)")
    p.add_argument("--batches", default="8,32,128", help="sequences decoded together, comma-separated (default 8,32,128)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default 128)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per sequence (default 32)")
    p.add_argument("--attention-gpus", type=int, default=1, help="GPUs running attention (default 1)")
    p.add_argument("--expert-gpus", type=int, default=0,
                   help="GPUs holding the routed experts, apart from the attention GPUs (default 0: colocated)")
    p.add_argument("--microbatches", type=int, default=1, help="microbatches per attention rank (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hbm-tbps", type=float, help="HBM bandwidth per GPU in TB/s (default: from the GPU's name)")
    p.add_argument("--eager", action="store_true", help="runtime without static buffers and CUDA graphs")
    p.add_argument("--skip-baseline", action="store_true", help="do not run transformers generate")
    p.add_argument("--generate-stock", action="store_true",
                   help="let generate switch its experts to batched_mm for decoding, as it does by default "
                        "(default: keep grouped_mm, which does not run out of memory on large experts)")
    p.add_argument("--json", action="store_true", help="print a JSON document instead of a table")
    args = p.parse_args()
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        print(f"bench/gpu_decode.py: error: --batches {args.batches!r}: give integers like 8,32,128", file=sys.stderr)
        return 2

    import torch

    ranks = args.attention_gpus + args.expert_gpus
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have < ranks:
        print(f"bench/gpu_decode.py: error: needs {ranks} CUDA GPUs ({args.attention_gpus} attention + "
              f"{args.expert_gpus} experts), this host has {have}; run it on a GPU host", file=sys.stderr)
        return 2

    gpu = torch.cuda.get_device_name(0)
    doc: dict = {"model": args.model, "gpu": gpu, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                 "attention_gpus": args.attention_gpus, "expert_gpus": args.expert_gpus,
                 "microbatches": args.microbatches, "static": not args.eager, "rows": []}
    base = {} if args.skip_baseline else baseline(args, batches)
    for b in batches:
        row = {"batch": b, "roofline": roofline(args, gpu, b)}
        if b in base:
            row["generate"] = base[b]["result"]
        row["runtime"] = run_runtime(args, b, base.get(b, {}).get("tokens"))
        doc["rows"].append(row)
    report(doc, args.json)
    return 0


def _spec(args, batch: int):
    from runtime.launch import model_facts
    from runtime.spec import RunSpec, make_instance

    facts = model_facts(RunSpec(args.model, 1, ()))
    attn = list(range(args.attention_gpus))
    experts = attn if not args.expert_gpus else list(range(args.attention_gpus, args.attention_gpus + args.expert_gpus))
    inst = make_instance("bench-0", ("prefill", "decode"), attn, experts, num_experts=facts.num_experts,
                         moe_layers=facts.moe_layers, slots_per_rank=math.ceil(facts.num_experts / len(experts)),
                         microbatches=args.microbatches, shared=attn)
    return RunSpec(args.model, args.attention_gpus + args.expert_gpus, (inst,), prompts=batch,
                   prompt_len=args.prompt_len, new_tokens=args.new_tokens, seed=args.seed, backend="nccl",
                   keep_logits=False, static=not args.eager)


def run_runtime(args, batch: int, base_tokens) -> dict:
    from runtime.launch import launch
    from runtime.metrics import summarise

    spec = _spec(args, batch)
    out = launch(spec, timeout_s=3600)
    m = summarise(spec, out.metrics, out.wall_s, None)["measured"]
    tpot = m["tpot_ms"]
    prefill_ms = m["prefill_ms"]
    r = {"tpot_ms": tpot, "tpot_basis": m["tpot_basis"], "prefill_ms": prefill_ms,
         "decode_tokens_per_s": round(batch / (tpot / 1e3), 1) if tpot else None,
         "prefill_tokens_per_s": round(batch * args.prompt_len / (prefill_ms / 1e3), 1) if prefill_ms else None,
         "stage_ms": m["stage_ms"], "setup_s": max(x.get("setup_s", 0.0) for x in out.metrics)}
    if base_tokens is not None:
        r["tokens_equal_to_generate"] = round((out.tokens == base_tokens).float().mean().item(), 4)
    return r


def baseline(args, batches: list[int]) -> dict:
    """transformers generate on GPU 0, one model for every batch: prefill time, decode tokens/s, tokens."""
    import torch

    from runtime.parts import build_full
    from runtime.spec import prompts_of

    spec = _spec(args, max(batches))
    _, model = build_full(spec, "cuda:0")
    if not args.generate_stock:
        # generate switches grouped_mm experts to batched_mm for decoding, which copies every chosen
        # expert's weights per token: at Mixtral's 352 MB experts that runs out of memory on one H200
        model._optimize_model_for_decode = contextlib.nullcontext
    out = {}
    for b in batches:
        ids = prompts_of(dataclasses.replace(spec, prompts=b), model.config.vocab_size).to("cuda:0")
        kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True, pad_token_id=0)

        def timed(n: int):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.no_grad():
                seq = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
            torch.cuda.synchronize()
            return time.perf_counter() - t0, seq

        timed(2)  # warm-up: kernels, allocator
        t1, _ = timed(1)
        tn, seq = timed(args.new_tokens)
        decode_s = max(tn - t1, 1e-9)
        out[b] = {"result": {"prefill_ms": round(t1 * 1e3, 2),
                             "tpot_ms": round(decode_s * 1e3 / max(args.new_tokens - 1, 1), 3),
                             "decode_tokens_per_s": round(b * (args.new_tokens - 1) / decode_s, 1)},
                  "tokens": seq[:, ids.shape[1]:].cpu()}
        del seq
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def roofline(args, gpu: str, batch: int) -> dict:
    """Lower bounds: a decode step from the bytes it must read from HBM, prefill from its FLOPs."""
    from costmodels import opcount
    from costmodels.hardware import H100, H200
    from planner.frontend.shape import shape_of

    s = shape_of(args.model)
    hw = H200 if "H200" in gpu else H100
    bw = (args.hbm_tbps or hw.chip_hbm_tbps) * 1e12
    wb = 2.0  # bf16
    E, k, B = s.num_routed_experts, s.top_k, batch
    touched = E * (1 - (1 - k / E) ** B)  # distinct experts a batch of B tokens reads per layer
    expert_bytes = s.num_moe_layers * touched * s.params_expert * wb
    dense_bytes = (s.params_total - s.num_moe_layers * E * s.params_expert) * wb
    kv_bytes = B * (args.prompt_len + args.new_tokens / 2) * opcount.kv_bytes_per_token(s, wb)
    gpus_a, gpus_e = args.attention_gpus, args.expert_gpus
    one = (expert_bytes + dense_bytes + kv_bytes) / bw
    if gpus_e:  # attention GPUs read the dense weights and their KV share; expert GPUs split the experts
        step = max((dense_bytes + kv_bytes / gpus_a) / bw, expert_bytes / gpus_e / bw)
    else:  # colocated: every GPU reads the dense weights, its KV share and its share of the experts
        step = (dense_bytes + (kv_bytes + expert_bytes) / gpus_a) / bw
    prefill_s = 2 * s.params_active * B * args.prompt_len / (hw.chip_bf16_tflops * 1e12 * (gpus_a + gpus_e))
    return {"hbm_tbps": bw / 1e12, "experts_touched_per_layer": round(touched, 1),
            "gb_per_step": round((expert_bytes + dense_bytes + kv_bytes) / 1e9, 2),
            "expert_share": round(expert_bytes / (expert_bytes + dense_bytes + kv_bytes), 3),
            "one_gpu_step_ms": round(one * 1e3, 3), "step_ms": round(step * 1e3, 3),
            "decode_tokens_per_s": round(B / step, 1),
            "prefill_ms": round(prefill_s * 1e3, 2), "prefill_tokens_per_s": round(B * args.prompt_len / prefill_s, 1),
            "bf16_tflops": hw.chip_bf16_tflops}


def report(doc: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(doc, indent=2, sort_keys=True))
        return
    layout = (f"{doc['attention_gpus']} GPU(s) colocated" if not doc["expert_gpus"] else
              f"{doc['attention_gpus']} attention + {doc['expert_gpus']} expert GPUs")
    print(f"{doc['model']} on {doc['gpu']}: bf16, prompt {doc['prompt_len']}, {doc['new_tokens']} new tokens; "
          f"runtime: {layout}, {'static buffers + CUDA graphs' if doc['static'] else 'eager'}")
    print(f"{'batch':>5} {'':24}{'decode tok/s':>13}{'TPOT ms':>9}{'% roofline':>11}{'prefill tok/s':>15}{'prefill ms':>11}")
    for row in doc["rows"]:
        b, r, g, roof = row["batch"], row["runtime"], row.get("generate"), row["roofline"]
        pct = f"{roof['step_ms'] / r['tpot_ms']:.0%}" if r["tpot_ms"] else "-"
        print(f"{b:>5} {'podplan runtime':24}{r['decode_tokens_per_s'] or 0:>13,.1f}{r['tpot_ms'] or 0:>9.2f}{pct:>11}"
              f"{r['prefill_tokens_per_s'] or 0:>15,.0f}{r['prefill_ms']:>11.1f}")
        if g:
            gp = f"{roof['step_ms'] / g['tpot_ms']:.0%}"
            gtps = b * doc["prompt_len"] / (g["prefill_ms"] / 1e3)
            print(f"{'':>5} {'transformers generate':24}{g['decode_tokens_per_s']:>13,.1f}{g['tpot_ms']:>9.2f}{gp:>11}"
                  f"{gtps:>15,.0f}{g['prefill_ms']:>11.1f}")
        print(f"{'':>5} {'roofline (HBM / compute)':24}{roof['decode_tokens_per_s']:>13,.1f}{roof['step_ms']:>9.2f}"
              f"{'100%':>11}{roof['prefill_tokens_per_s']:>15,.0f}{roof['prefill_ms']:>11.1f}")
        extra = f"; runtime tokens equal to generate's: {r['tokens_equal_to_generate']:.1%}" if "tokens_equal_to_generate" in r else ""
        stages = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["stage_ms"].items(), key=lambda kv: -kv[1])[:5])
        print(f"{'':>5}   {roof['gb_per_step']} GB per step ({roof['experts_touched_per_layer']} experts touched per "
              f"layer, experts {roof['expert_share']:.0%} of bytes) at {roof['hbm_tbps']} TB/s{extra}")
        if stages:
            print(f"{'':>5}   profiled step, a CUDA graph per stage (ms): {stages}")
    print("prefill tok/s of generate: prompt tokens / its 1-token run (prefill + one step). TPOT of the runtime: "
          "CUDA-graph replays; the bf16 greedy paths of two implementations may part after a near-tie.")


if __name__ == "__main__":
    sys.exit(main())
