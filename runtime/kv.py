"""The KV cache of one microbatch, and its packing for the prefill -> decode hand-over.

The cache is the staged program's own `past_key_values` input (`planner.frontend.stages.KVCache`,
the class the passes use): attention stages of every transformers family call
`past_key_values.update(k, v, layer_idx)` with tensors [batch, heads, seq, dim] (MLA caches its
compressed latents the same way); rows are sequences, dim -2 is the position.
"""

from __future__ import annotations

import torch

from planner.frontend.stages import KVCache, new_kv_cache


def kv_rows(cache: KVCache, idx: list[int]) -> list[torch.Tensor]:
    """Keys and values of sequences `idx` (rows), layer by layer: [k0, v0, k1, v1, ...]."""
    out = []
    for layer in sorted(cache.layers):
        k, v = cache.layers[layer]
        out += [k[idx], v[idx]]
    return out


def kv_from_rows(layers: list[int], tensors: list[torch.Tensor]) -> KVCache:
    """A cache holding `layers` from [k0, v0, k1, v1, ...] (what `kv_rows` and `unpack` give)."""
    cache = new_kv_cache()
    for i, layer in enumerate(layers):
        cache.layers[layer] = (tensors[2 * i], tensors[2 * i + 1])
    return cache


def pack(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(header int64 [n, 5]: ndim + 4 dims per tensor, payload 1-D) for one point-to-point send."""
    header = torch.zeros((len(tensors), 5), dtype=torch.int64)
    for i, t in enumerate(tensors):
        if t.ndim > 4:
            raise ValueError(f"KV tensor of {t.ndim} dims; the hand-over packs at most 4")
        header[i, 0] = t.ndim
        header[i, 1:1 + t.ndim] = torch.tensor(t.shape)
    payload = torch.cat([t.reshape(-1) for t in tensors]) if tensors else torch.zeros(0)
    return header, payload


def unpack(header: torch.Tensor, payload: torch.Tensor) -> list[torch.Tensor]:
    out, at = [], 0
    for row in header.tolist():
        shape = row[1:1 + row[0]]
        n = 1
        for d in shape:
            n *= d
        out.append(payload[at:at + n].view(shape))
        at += n
    return out


def payload_numel(header: torch.Tensor) -> int:
    total = 0
    for row in header.tolist():
        n = 1
        for d in row[1:1 + row[0]]:
            n *= d
        total += n
    return total
