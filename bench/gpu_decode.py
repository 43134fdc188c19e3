"""Decode tokens/s on GPUs: podplan's runtime with attention and experts on different GPUs (NCCL),
against transformers' `generate` on one GPU and against the HBM-bandwidth roofline of a decode step.

    .venv/bin/python bench/gpu_decode.py                          # Qwen3-30B-A3B shape, 1 attention + 1 expert GPU
    .venv/bin/python bench/gpu_decode.py --expert-gpus 2 --batch 64 --microbatches 2
    .venv/bin/python bench/gpu_decode.py --model tiny-qwen3-moe   # a smoke test of the GPU path

The model is the bundled config with seeded random bf16 weights (built on each GPU: identical on
every GPU, though not to a CPU build of the same seed). Baseline: `generate` (greedy, KV cache) of the same model on GPU 0; its
decode rate is (tokens of a T-token run - tokens of a 1-token run) / time difference. Runtime: one
rank per GPU, attention ranks first, then expert ranks; decode rate = batch / measured TPOT.
Roofline: a decode step must read every active weight once from HBM (attention + norms + head, the
gates, and the experts the batch touches: E * (1 - (1 - k/E)^B) per layer under uniform routing)
plus the KV cache; step time >= bytes / HBM bandwidth, on one GPU and split as the runtime splits it.
Without CUDA (or with too few GPUs) it exits 2 with one line.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-30b-a3b", help="bundled model (default qwen3-30b-a3b)")
    p.add_argument("--batch", type=int, default=32, help="sequences decoded together (default 32)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default 128)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per sequence (default 32)")
    p.add_argument("--attention-gpus", type=int, default=1, help="GPUs running attention (default 1)")
    p.add_argument("--expert-gpus", type=int, default=1, help="GPUs holding the routed experts (default 1)")
    p.add_argument("--microbatches", type=int, default=1, help="microbatches per attention rank (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hbm-tbps", type=float, help="HBM bandwidth per GPU in TB/s (default: from the GPU's name)")
    p.add_argument("--skip-baseline", action="store_true", help="do not run transformers generate")
    p.add_argument("--colocated", action="store_true",
                   help="every GPU runs attention and holds experts (a 1-GPU host can run the NCCL path this way)")
    p.add_argument("--baseline-only", action="store_true",
                   help="one GPU: only transformers generate and the roofline (no multi-GPU runtime run)")
    p.add_argument("--json", action="store_true", help="print a JSON document instead of a table")
    args = p.parse_args()

    import torch

    ranks = args.attention_gpus if args.colocated else args.attention_gpus + args.expert_gpus
    need = 1 if args.baseline_only else ranks
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have < need:
        print(f"bench/gpu_decode.py: error: needs {need} CUDA GPUs ({args.attention_gpus} attention + "
              f"{args.expert_gpus} experts), this host has {have}; run it on a GPU host", file=sys.stderr)
        return 2

    from runtime.launch import launch, model_facts
    from runtime.metrics import summarise
    from runtime.spec import RunSpec, make_instance

    facts = model_facts(RunSpec(args.model, 1, ()))
    attn = list(range(args.attention_gpus))
    experts = attn if args.colocated else list(range(args.attention_gpus, ranks))
    inst = make_instance("afd-0", ("prefill", "decode"), attn, experts, num_experts=facts.num_experts,
                         moe_layers=facts.moe_layers, slots_per_rank=math.ceil(facts.num_experts / len(experts)),
                         microbatches=args.microbatches)
    spec = RunSpec(args.model, ranks, (inst,), prompts=args.batch, prompt_len=args.prompt_len,
                   new_tokens=args.new_tokens, seed=args.seed, backend="nccl", keep_logits=False)
    gpu = torch.cuda.get_device_name(0)
    doc: dict = {"model": args.model, "gpu": gpu, "batch": args.batch, "prompt_len": args.prompt_len,
                 "new_tokens": args.new_tokens, "attention_gpus": args.attention_gpus,
                 "expert_gpus": 0 if args.colocated else args.expert_gpus, "colocated": args.colocated,
                 "microbatches": args.microbatches}

    base_tokens = None
    if not args.skip_baseline:
        doc["generate"], base_tokens = baseline(spec)

    if args.baseline_only:
        doc["roofline"] = roofline(args, gpu)
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    out = launch(spec, timeout_s=3600)
    summary = summarise(spec, out.metrics, out.wall_s, None)
    tpot = summary["measured"]["tpot_ms"]
    doc["runtime"] = {"tpot_ms": tpot, "prefill_ms": summary["measured"]["prefill_ms"],
                      "decode_tokens_per_s": args.batch / (tpot / 1e3) if tpot else None,
                      "setup_s": max(r["setup_s"] for r in summary["ranks"]),
                      "bytes_sent": summary["measured"]["bytes_sent"],
                      "stage_ms": {r["rank"]: r["stage_ms"] for r in summary["ranks"]}}
    if base_tokens is not None:
        same = (out.tokens == base_tokens).float().mean().item()
        doc["runtime"]["tokens_equal_to_generate"] = round(same, 4)
    doc["roofline"] = roofline(args, gpu)
    report(doc, args.json)
    return 0


def baseline(spec) -> tuple[dict, object]:
    """transformers generate on GPU 0: prefill time, decode tokens/s, the tokens."""
    import torch

    from runtime.parts import build_full
    from runtime.spec import prompts_of

    _, model = build_full(spec, "cuda:0")
    ids = prompts_of(spec, model.config.vocab_size).to("cuda:0")
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, do_sample=False, use_cache=True, pad_token_id=0)

    def timed(n: int):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            seq = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t0, seq

    timed(2)  # warm-up: kernels, allocator
    t1, _ = timed(1)
    tn, seq = timed(spec.new_tokens)
    decode_s = max(tn - t1, 1e-9)
    result = {"prefill_ms": round(t1 * 1e3, 2), "tpot_ms": round(decode_s * 1e3 / max(spec.new_tokens - 1, 1), 3),
              "decode_tokens_per_s": round(spec.prompts * (spec.new_tokens - 1) / decode_s, 1),
              "peak_gb": round(torch.cuda.max_memory_allocated(0) / 1e9, 1)}
    tokens = seq[:, ids.shape[1]:].cpu()
    del model, seq
    gc.collect()
    torch.cuda.empty_cache()
    return result, tokens


def roofline(args, gpu: str) -> dict:
    """Lower bound of a decode step from the bytes it must read from HBM."""
    from costmodels import opcount
    from costmodels.hardware import H100, H200
    from planner.frontend.shape import shape_of

    s = shape_of(args.model)
    tbps = args.hbm_tbps or (H200.chip_hbm_tbps if "H200" in gpu else H100.chip_hbm_tbps)
    bw = tbps * 1e12
    wb = 2.0  # bf16
    E, k, B = s.num_routed_experts, s.top_k, args.batch
    touched = E * (1 - (1 - k / E) ** B)  # distinct experts a batch of B tokens reads per layer
    expert_bytes = s.num_moe_layers * touched * s.params_expert * wb
    dense_bytes = (s.params_total - s.num_moe_layers * E * s.params_expert) * wb
    kv_bytes = B * (args.prompt_len + args.new_tokens / 2) * opcount.kv_bytes_per_token(s, wb)
    one_gpu = (expert_bytes + dense_bytes + kv_bytes) / bw
    # each attention GPU reads all non-expert weights (data parallel) and its share of the KV cache
    split = max((dense_bytes + kv_bytes / args.attention_gpus) / bw, expert_bytes / args.expert_gpus / bw)
    return {"hbm_tbps": tbps, "experts_touched_per_layer": round(touched, 1),
            "gb_per_step": round((expert_bytes + dense_bytes + kv_bytes) / 1e9, 2),
            "one_gpu_step_ms": round(one_gpu * 1e3, 3), "one_gpu_tokens_per_s": round(B / one_gpu, 1),
            "split_step_ms": round(split * 1e3, 3), "split_tokens_per_s": round(B / split, 1)}


def report(doc: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(doc, indent=2, sort_keys=True))
        return
    r, g, roof = doc["runtime"], doc.get("generate"), doc["roofline"]
    print(f"{doc['model']} on {doc['gpu']}: batch {doc['batch']}, prompt {doc['prompt_len']}, "
          f"{doc['new_tokens']} new tokens; runtime = {doc['attention_gpus']} attention + {doc['expert_gpus']} "
          f"expert GPUs, {doc['microbatches']} microbatch(es)")
    print(f"{'':34}{'decode tok/s':>14}{'TPOT ms':>10}{'prefill ms':>12}")
    if g:
        print(f"{'transformers generate, 1 GPU':34}{g['decode_tokens_per_s']:>14,.1f}{g['tpot_ms']:>10.2f}"
              f"{g['prefill_ms']:>12.1f}")
    print(f"{'podplan runtime (NCCL)':34}{r['decode_tokens_per_s'] or 0:>14,.1f}{r['tpot_ms'] or 0:>10.2f}"
          f"{r['prefill_ms']:>12.1f}")
    print(f"{'HBM roofline, 1 GPU':34}{roof['one_gpu_tokens_per_s']:>14,.1f}{roof['one_gpu_step_ms']:>10.2f}")
    print(f"{'HBM roofline, split as the runtime':34}{roof['split_tokens_per_s']:>14,.1f}{roof['split_step_ms']:>10.2f}")
    print(f"roofline: {roof['gb_per_step']} GB read per step ({roof['experts_touched_per_layer']} experts "
          f"touched per layer) at {roof['hbm_tbps']} TB/s per GPU")
    if "tokens_equal_to_generate" in r:
        print(f"runtime tokens equal to generate's: {r['tokens_equal_to_generate']:.1%} (bf16: kernels and "
              "batch splits differ, so greedy paths may part after a near-tie)")


if __name__ == "__main__":
    sys.exit(main())
