"""The KV cache of one microbatch, and its packing for the prefill -> decode hand-over.

The cache is the staged program's own `past_key_values` input (`planner.frontend.stages.KVCache`,
the class the passes use): attention stages of every transformers family call
`past_key_values.update(k, v, layer_idx)` with tensors [batch, heads, seq, dim] (MLA caches its
compressed latents the same way); rows are sequences, dim -2 is the position.
"""

from __future__ import annotations

import torch

from planner.frontend.stages import KVCache, new_kv_cache


def kv_rows(cache: KVCache | StaticKVCache, idx: list[int]) -> list[torch.Tensor]:
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


class StaticKVCache:
    """A preallocated cache: `capacity` positions per layer, written at device-side positions.

    Same protocol as the staged program's cache (`update(key, value, layer_idx)`), but the buffers
    never move: a step writes its S new keys at `position .. position + S - 1` (a 0-dim int64 tensor
    the worker sets before the step) and attention reads all `capacity` positions under a mask that
    hides the unwritten ones (`runtime.lower.static_causal_mask`). Nothing depends on a host-side
    length, so a decode step can be captured once and replayed as a CUDA graph.
    """

    def __init__(self, capacity: int, position: torch.Tensor):
        self.capacity = capacity
        self.position = position
        self.buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.length = 0  # positions written (host), for the prefill -> decode hand-over

    def _alloc(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.buffers:
            k = key.new_zeros((*key.shape[:-2], self.capacity, key.shape[-1]))
            v = value.new_zeros((*value.shape[:-2], self.capacity, value.shape[-1]))
            self.buffers[layer] = (k, v)
        return self.buffers[layer]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self._alloc(layer_idx, key, value)
        at = self.position + torch.arange(key.shape[-2], device=key.device)
        k.index_copy_(-2, at, key.to(k.dtype))
        v.index_copy_(-2, at, value.to(v.dtype))
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    @property
    def layers(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """The written positions of every layer (what `kv_rows` hands over)."""
        return {layer: (k[..., :self.length, :], v[..., :self.length, :]) for layer, (k, v) in self.buffers.items()}

    def load(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Fill a layer's first positions from a handed-over cache ([B, heads, L, d] each)."""
        k, v = self._alloc(layer, key, value)
        k[..., :key.shape[-2], :] = key
        v[..., :value.shape[-2], :] = value
        self.length = key.shape[-2]
