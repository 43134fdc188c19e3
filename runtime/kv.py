"""The KV cache of one microbatch, and its packing for the prefill -> decode hand-over.

Attention modules of every transformers family call `past_key_values.update(k, v, layer_idx)`
with tensors [batch, heads, seq, dim] (MLA caches its compressed latents the same way), so one
small store serves all families; rows are sequences, dim -2 is the position.
"""

from __future__ import annotations

import torch


class KVStore:
    """Per-layer (keys, values) with the transformers Cache calls attention modules make."""

    def __init__(self) -> None:
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *_: object, **__: object):
        if layer_idx in self.layers:
            k0, v0 = self.layers[layer_idx]
            keys, values = torch.cat([k0, keys], dim=-2), torch.cat([v0, values], dim=-2)
        self.layers[layer_idx] = (keys, values)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        kv = self.layers.get(layer_idx)
        return 0 if kv is None else kv[0].shape[-2]

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers.values())

    def rows(self, idx: list[int]) -> list[torch.Tensor]:
        """Keys and values of sequences `idx` (rows), layer by layer: [k0, v0, k1, v1, ...]."""
        out = []
        for layer in sorted(self.layers):
            k, v = self.layers[layer]
            out += [k[idx], v[idx]]
        return out

    @classmethod
    def from_rows(cls, layers: list[int], tensors: list[torch.Tensor]) -> KVStore:
        store = cls()
        for i, layer in enumerate(layers):
            store.layers[layer] = (tensors[2 * i], tensors[2 * i + 1])
        return store


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
