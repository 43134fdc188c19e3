"""GPU fast paths for a rank's model: the same maths with fewer, larger kernels.

Measured on one H200 (a torch.profiler trace of a captured Qwen3-30B-A3B decode step at batch 32,
`PODPLAN_KERNEL_PROFILE`): beside 18 ms of expert weight reads, a step spent 17 ms in about 1,600
small kernels, the largest being eager attention's `repeat_kv` copies of the whole static cache
(2 x 47 us per layer), the int64 radix sort of the grouped experts path (26 us per layer) and seven
kernels per RMSNorm. So on a CUDA bf16 model:

- attention runs transformers' own "sdpa" implementation where the family supports it (a decode
  query is packed per KV head, so the cache is never expanded);
- routed experts run the Triton kernels of `runtime.moe_triton` when Triton is importable
  (transformers' grouped_mm forward otherwise, and for modules the kernels do not cover);
- RMSNorm modules run torch's fused `rms_norm`, kept only where a probe matches the module's own
  output (families whose norm differs keep theirs).

The CPU path and the reference model are untouched: the check compares against stock transformers.
"""

from __future__ import annotations

import os
import types
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

# A/B runs: "0" turns every fast path off; a comma list of no-sdpa, no-triton, no-norm turns those off.
FAST_PATHS_ENV = "PODPLAN_FAST_PATHS"
# A probe's max |difference| allowed between a module's RMSNorm and the fused one (bf16 rounding).
_PROBE_TOL = 2e-2


def _fused_rms_forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    normed = F.rms_norm(hidden_states.float(), (hidden_states.shape[-1],), eps=self.variance_epsilon)
    return self.weight * normed.to(hidden_states.dtype)


def fuse_rms_norms(model: nn.Module) -> int:
    """Point every RMSNorm module whose output the fused form reproduces at it; returns how many."""
    done = 0
    verdict: dict[type, bool] = {}
    for m in model.modules():
        w = getattr(m, "weight", None)
        if not type(m).__name__.endswith("RMSNorm") or not isinstance(w, torch.Tensor) or w.dim() != 1:
            continue
        if not hasattr(m, "variance_epsilon") or w.device.type == "meta":
            continue
        if type(m) not in verdict:
            gen = torch.Generator(device=w.device).manual_seed(0)
            probe = torch.randn(4, w.shape[0], generator=gen, device=w.device).to(w.dtype) * 3
            with torch.no_grad():
                want = m(probe)
                got = _fused_rms_forward(m, probe)
            verdict[type(m)] = bool((want.float() - got.float()).abs().max() <= _PROBE_TOL * want.float().abs().max())
        if verdict[type(m)]:
            m.forward = types.MethodType(_fused_rms_forward, m)
            done += 1
    return done


def speed_up(model: nn.Module) -> list[str]:
    """Switch a CUDA bf16 model to the fast paths; returns what changed, one phrase each."""
    changes: list[str] = []
    off = set(os.environ.get(FAST_PATHS_ENV, "").split(","))
    if "0" in off:
        return changes
    cfg: Any = model.config
    if getattr(type(model), "_supports_sdpa", False) and "no-sdpa" not in off:
        cfg._attn_implementation = "sdpa"
        changes.append("sdpa attention")
    try:
        if "no-triton" in off:
            raise ImportError("no-triton")
        from runtime.moe_triton import register
    except ImportError:  # no Triton: transformers' grouped_mm experts stay
        pass
    else:
        cfg._experts_implementation = register()
        changes.append("triton experts")
    if "no-norm" in off:
        return changes
    n = fuse_rms_norms(model)
    if n:
        changes.append(f"fused rms_norm x{n}")
    return changes
