"""What a transformers config class's keys mean, read from the class (field names, not family names).

Shared by config validation (`planner.frontend.trace.validate_config`) and the family enumeration
(`planner.frontend.families`): a new family that spells its expert count one of these ways is found,
and its config.json checked, with no change here.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

EXPERT_COUNT_KEYS = ("n_routed_experts", "num_experts", "num_local_experts", "moe_num_experts")
TOP_K_KEYS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "moe_top_k", "top_k_experts")
# the routed experts' (and shared experts', and dense layers') hidden sizes
INTERMEDIATE = re.compile(r"(^|_)intermediate_size$|^expert_ffn_hidden_size$|^share_expert_dim$")
SHARED_COUNT = re.compile(r"^(n|num|moe_num)_shared_experts$")
# Every config carries these whatever its family; podplan refuses to guess them.
REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
# Integer keys of the MoE shape beyond REQUIRED: a string or a list there is a broken config.json.
_SHAPE_INTS = re.compile(r"^(num_key_value_heads|head_dim|first_k_dense_replace|moe_layer_freq|n_group|topk_group|"
                         r"q_lora_rank|kv_lora_rank|qk_nope_head_dim|qk_rope_head_dim|v_head_dim|sliding_window)$")


def fields(cls: type) -> dict[str, Any]:
    """A config class's constructor keys and their defaults (transformers 5 configs are dataclasses)."""
    if not dataclasses.is_dataclass(cls):
        return {}
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = None
    return out


def aliases(cls: type) -> dict[str, str]:
    """Standard key -> the key the class stores it under (DBRX's d_model for hidden_size)."""
    amap = getattr(cls, "attribute_map", None)
    return dict(amap) if isinstance(amap, dict) else {}


def keys(cls: type) -> set[str]:
    """Every key the class knows, its aliases included."""
    return set(fields(cls)) | set(aliases(cls))


def declares_experts(cls: type) -> bool:
    return any(k in keys(cls) for k in EXPERT_COUNT_KEYS)


def moe_shape_keys(cls: type) -> list[tuple[str, ...]]:
    """The keys a config.json of `cls`'s family must carry, each as its accepted spellings (one must be
    present): the REQUIRED ones, the expert count and top-k where the class has them, and every
    intermediate size the class declares with a default (the dense MLP's, the experts', the shared
    experts'). A family's class default describes some other model: a missing key is never filled."""
    known = keys(cls)
    amap = aliases(cls)
    # a REQUIRED key the class neither declares nor aliases is one it derives (LongCat's num_layers)
    out = [tuple(dict.fromkeys((k, amap.get(k, k)))) for k in REQUIRED if k in known or not known]
    for group in (EXPERT_COUNT_KEYS, TOP_K_KEYS):
        spelled = tuple(dict.fromkeys(s for k in group if k in known for s in (k, amap.get(k, k))))
        if spelled:
            out.append(spelled)
    for name, default in fields(cls).items():
        if INTERMEDIATE.search(name) and isinstance(default, int) and not isinstance(default, bool):
            out.append((name,))
    return out


def shape_int_key(key: str) -> bool:
    """Whether `key` holds a whole number of the MoE shape (a count or a size)."""
    return (key in REQUIRED or key in EXPERT_COUNT_KEYS or key in TOP_K_KEYS or bool(INTERMEDIATE.search(key))
            or bool(SHARED_COUNT.match(key)) or bool(_SHAPE_INTS.match(key)))
