"""Graph plumbing shared by the passes: copying a GraphModule, finding stages, example inputs.

Passes never mutate the caller's graph: a transform copies first (`copy_module`) and edits its copy.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from passes.errors import UnsupportedModelError

from passes import meta

# Placeholder names the kv-cache pass adds after `input_ids` (see passes/kv_cache.py).
PAST_LEN = "past_len"
PAST_KEY_VALUES = "past_key_values"


def copy_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over the same submodules with its own graph, node metadata and graph metadata."""
    graph = fx.Graph()
    result = graph.graph_copy(gm.graph, {})
    graph.output(result).meta = dict(gm.graph.output_node().meta)
    out = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    out.meta = dict(gm.meta)
    return out


def program_order(key: meta.StageKey, num_layers: int) -> tuple[int, int]:
    """Where a stage runs in the program: embed, then per layer in STAGE_KINDS order, then head."""
    if key.kind == "embed":
        return (-1, 0)
    if key.kind == "head":
        return (num_layers, 0)
    assert key.layer is not None, key
    return (key.layer, meta.STAGE_KINDS.index(key.kind))


def stage_calls(gm: fx.GraphModule) -> list[tuple[fx.Node, meta.StageKey]]:
    """(call node, stage) for every stage submodule call of a staged program, in program order."""
    meta.graph_meta(gm, meta.STAGED)
    return [(n, meta.stage_key_of(n)) for n in gm.graph.nodes if n.op == "call_module"]


def stage_module(gm: fx.GraphModule, node: fx.Node) -> fx.GraphModule:
    sub = gm.get_submodule(str(node.target))
    assert isinstance(sub, fx.GraphModule), f"stage {node.target} is not a GraphModule"
    return sub


class KVCache:
    """The KV cache protocol transformers' attention modules call: `update(key, value, layer_idx)`
    appends the new tokens' keys and values ([B, heads, S, d]) and returns all of that layer's.

    Every layer keeps all its keys: sliding windows are applied by the mask (passes/kv_cache.py).
    A worker holding some layers' attention holds a KVCache with just those layers filled.
    """

    def __init__(self) -> None:
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx in self.layers:
            old_key, old_value = self.layers[layer_idx]
            key, value = torch.cat([old_key, key], dim=-2), torch.cat([old_value, value], dim=-2)
        self.layers[layer_idx] = (key, value)
        return key, value

    def get_seq_length(self, layer_idx: int = 0) -> int:
        entry = self.layers.get(layer_idx)
        return 0 if entry is None else int(entry[0].shape[-2])

    def __getattr__(self, name: str):
        # Only reached for what the class lacks: a family whose attention keeps more state in the
        # cache (a sparse-attention indexer, linear-attention states) than keys and values.
        if name.startswith("__"):
            raise AttributeError(name)
        raise UnsupportedModelError(f"this family's attention calls past_key_values.{name}(), cache state beyond keys and "
                          "values that podplan's KV cache does not hold; the family is not supported")


def new_kv_cache() -> KVCache:
    """An empty cache for the staged program's `past_key_values` input."""
    return KVCache()


def example_inputs(gm: fx.GraphModule, batch: int, seq: int, past: int, device: torch.device | str) -> list:
    """Placeholder values for a (batch, seq new tokens, past cached) signature, in placeholder order.

    With past > 0 the cache is filled by running `gm` once on `past` tokens first (cheap on meta).
    """
    names = [str(n.target) for n in gm.graph.nodes if n.op == "placeholder"]
    cache = None
    if past > 0:
        if PAST_KEY_VALUES not in names:
            raise meta.MetadataError("a signature with past > 0 needs the KV cache as a graph input; run the 'kv-cache' pass first")
        cache = new_kv_cache()
        with torch.no_grad():
            gm(*_values(names, batch, past, 0, cache, device))
    return _values(names, batch, seq, past, cache, device)


def _values(names: list[str], batch: int, seq: int, past: int, cache, device) -> list:
    by_name = {
        "input_ids": torch.zeros((batch, seq), dtype=torch.long, device=device),
        PAST_LEN: past,
        PAST_KEY_VALUES: cache,
    }
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise meta.MetadataError(f"graph input '{unknown[0]}' is not one podplan knows (input_ids, {PAST_LEN}, {PAST_KEY_VALUES})")
    return [by_name[n] for n in names]


def device_of(gm: fx.GraphModule) -> torch.device:
    param = next(gm.parameters(), None)
    return param.device if param is not None else torch.device("meta")
