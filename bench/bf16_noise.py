"""The bf16 noise floor the runtime's check must allow: two stock transformers implementations of the
same model (eager and SDPA attention) on the same tokens, compared as `podplan run` compares the
runtime with its reference (logits of the last prompt position and every generated position).

    python bench/bf16_noise.py                              # Qwen3-30B-A3B, 32 x (128 + 32) tokens
    python bench/bf16_noise.py --model mixtral-8x7b --prompts 16

Seeded random weights and token ids; needs a CUDA GPU with room for the model (exit 2 otherwise).
`runtime.reference.tolerance_for` sits at about twice the ratio this prints.
"""

from __future__ import annotations

import argparse
import sys


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-30b-a3b")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("bench/bf16_noise.py: error: needs a CUDA GPU; run it on a GPU host", file=sys.stderr)
        return 2
    from runtime.parts import build_full
    from runtime.spec import RunSpec

    spec = RunSpec(args.model, 1, (), prompts=args.prompts, prompt_len=args.prompt_len, new_tokens=args.new_tokens)
    _, model = build_full(spec, "cuda:0")
    if not getattr(type(model), "_supports_sdpa", False):
        print(f"bench/bf16_noise.py: error: {args.model} has no SDPA attention to compare with", file=sys.stderr)
        return 2
    n = args.prompt_len + args.new_tokens
    ids = torch.randint(0, model.config.vocab_size, (args.prompts, n), generator=torch.Generator().manual_seed(0))
    ids = ids.to("cuda:0")
    outs = {}
    with torch.no_grad():
        for impl in ("eager", "sdpa"):
            model.config._attn_implementation = impl
            outs[impl] = torch.cat([model(input_ids=ids[i:i + 8]).logits[:, args.prompt_len - 1:].float()
                                    for i in range(0, args.prompts, 8)])
    diff = (outs["eager"] - outs["sdpa"]).abs()
    top = outs["eager"].abs().max().item()
    print(f"{args.model}, bf16, {args.prompts} x {n} tokens: eager vs SDPA attention (both stock transformers): "
          f"max |logit diff| {diff.max().item():.4f}, largest |logit| {top:.3f} ({diff.max().item() / top:.2%}), "
          f"mean |diff| {diff.mean().item():.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
