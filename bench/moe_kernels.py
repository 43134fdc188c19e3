"""Routed experts alone: a decode step's experts of every MoE layer in one CUDA graph, transformers'
grouped_mm forward against podplan's Triton kernels (`runtime.moe_triton`), with the weight bytes
each reads per second.

    python bench/moe_kernels.py                         # Qwen3-30B-A3B shape, batch 8/32/128
    python bench/moe_kernels.py --model mixtral-8x7b --batches 32
    python bench/moe_kernels.py --sweep                 # also try other decode tiles

Weights are seeded random bf16 in transformers' layout; routing is uniform random top-k (the bytes
counted are those of the experts the batch touches). Each implementation's output is checked
against grouped_mm's on the first layer. Needs CUDA and Triton; without them it exits 2.
"""

from __future__ import annotations

import argparse
import sys


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-30b-a3b")
    p.add_argument("--batches", default="8,32,128")
    p.add_argument("--layers", type=int, help="MoE layers (default: the model's)")
    p.add_argument("--sweep", action="store_true", help="time other decode tile shapes too")
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("bench/moe_kernels.py: error: needs a CUDA GPU; run it on a GPU host", file=sys.stderr)
        return 2
    try:
        from runtime import moe_triton
    except ImportError:
        print("bench/moe_kernels.py: error: needs Triton (pip install triton)", file=sys.stderr)
        return 2
    from transformers.integrations.moe import grouped_mm_experts_forward

    from planner.frontend.trace import build_model
    from planner.frontend.zoo import load_source

    src = load_source(args.model)
    cfg = build_model(src, device="meta").config
    layers = args.layers or len([i for i in range(cfg.num_hidden_layers)])
    experts_cls = None
    model = build_model(src, device="meta")
    for m in model.modules():
        if hasattr(m, "gate_up_proj") and hasattr(m, "down_proj"):
            experts_cls = type(m)
            break
    if experts_cls is None:
        print(f"bench/moe_kernels.py: error: {args.model} has no fused experts module", file=sys.stderr)
        return 2
    del model
    cfg._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    mods = []
    with torch.device("cuda"):
        for _ in range(layers):
            m = experts_cls(cfg).to(torch.bfloat16)
            with torch.no_grad():
                m.gate_up_proj.normal_(0, 0.02)
                m.down_proj.normal_(0, 0.02)
            mods.append(m)
    E, k, H = mods[0].num_experts, cfg.num_experts_per_tok, cfg.hidden_size
    expert_bytes = sum(p.numel() for p in mods[0].parameters()) * 2 / E

    def graph_ms(fn, reps: int = 10) -> float:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        g.replay()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            g.replay()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b) / reps

    variants = {"grouped_mm": grouped_mm_experts_forward, "triton": moe_triton.triton_experts_forward}
    sweep = [{"BN": bn, "BK": bk, "num_stages": st, "num_warps": nw} for bn, bk, st, nw in
             [(32, 128, 4, 4), (128, 128, 3, 4), (64, 128, 3, 4), (64, 256, 3, 4), (64, 128, 4, 8)]] if args.sweep else []
    print(f"{args.model}: {layers} MoE layers, {E} experts, top-{k}, {expert_bytes / 1e6:.1f} MB per expert, bf16")
    print(f"{'batch':>5} {'implementation':40}{'ms':>8}{'TB/s':>7}{'max |diff|':>11}")
    for B in [int(b) for b in args.batches.split(",")]:
        x = torch.randn(B, H, device="cuda", dtype=torch.bfloat16)
        w, ids = torch.topk(torch.randn(layers, B, E, device="cuda").softmax(-1), k, dim=-1)
        w = (w / w.sum(-1, keepdim=True)).to(torch.bfloat16)
        touched = sum(int(torch.unique(ids[i]).numel()) for i in range(layers))
        gb = touched * expert_bytes / 1e9
        bm = moe_triton.block_rows(B * k, E)
        default = dict(moe_triton.TILES[bm])
        with torch.no_grad():
            want = grouped_mm_experts_forward(mods[0], x, ids[0], w[0]).float()
            for name, fn in variants.items():
                for t in ([None] if name != "triton" else [default] + sweep):
                    if t is not None:
                        moe_triton.TILES[bm].update(t)
                    diff = (fn(mods[0], x, ids[0], w[0]).float() - want).abs().max().item()
                    ms = graph_ms(lambda: [fn(mods[i], x, ids[i], w[i]) for i in range(layers)])
                    label = name if t is None else f"triton {bm}x{t['BN']}x{t['BK']} s{t['num_stages']} w{t['num_warps']}"
                    print(f"{B:>5} {label:40}{ms:>8.2f}{gb / ms:>7.2f}{diff:>11.2e}", flush=True)
            moe_triton.TILES[bm].update(default)
    return 0


if __name__ == "__main__":
    sys.exit(main())
