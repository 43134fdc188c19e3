"""The Mixture-of-Experts families of the installed transformers, found by reading it, and what podplan
makes of each: traced (lossless, checked by tests/planner/test_families.py) or refused in one line.

A family is a folder of `transformers.models` one of whose config classes (or their sub-configs)
declares a routed-expert count. Its status comes from trying: a tiny config made from the family's own
config class (the class's defaults with the sizes shrunk, so every key a real config.json of the
family carries is there) is loaded, validated, built on the meta device, traced and compiled through
the stage-split pipeline, exactly as `podplan trace CONFIG --stages` would; the first one-line error
is the refusal. Statuses are cached per transformers version and podplan source (tracing every family
takes a minute), in $PODPLAN_CACHE or ~/.cache/podplan.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from costmodels.errors import PodplanError
from planner.frontend.config_keys import (EXPERT_COUNT_KEYS, INTERMEDIATE, SHARED_COUNT, TOP_K_KEYS, aliases,
                                          declares_experts, fields)
from planner.frontend.zoo import ModelSource

# flags that switch a family's MoE block on (Gemma 4's enable_moe_block, Doge's is_moe)
_MOE_SWITCH = re.compile(r"^(is_moe|enable_moe_block|use_moe)$")
# Multi-head latent attention (DeepSeek-V2/V3 and kin): one latent KV head per query head.
_MLA = dict(q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
# Sizes of the tiny config, set wherever the family's config has the key.
_TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
             max_position_embeddings=512, n_group=1, topk_group=1, num_expert_group=1, pad_token_id=0,
             bos_token_id=1, eos_token_id=2)
TINY_EXPERTS = 8
TINY_TOP_K = 2
TINY_VOCAB = 128
_TINY_LAYERS = 4  # Beam and Flint keep their first 3 and 2 layers dense by default
_TINY_WINDOW = 3  # a sliding window that bites on the family test's 8-token sequences


@dataclass(frozen=True)
class Family:
    """One MoE family: its transformers folder, the model_type a config.json of it carries, and the
    model_type of the decoder podplan plans (the same, or a multimodal config's text_config)."""

    name: str  # folder under transformers/models
    model_type: str
    decoder_type: str


@dataclass(frozen=True)
class FamilyStatus:
    family: Family
    traced: bool
    reason: str  # the one-line refusal ("" when traced)

    def row(self) -> dict:
        return {"family": self.family.name, "model_type": self.family.model_type,
                "decoder": self.family.decoder_type, "status": "traced" if self.traced else "refused",
                "reason": self.reason}


# --- enumeration ------------------------------------------------------------------------------------


def _sub_configs(cls: type) -> dict[str, type]:
    subs = getattr(cls, "sub_configs", None) or {}
    return {k: v for k, v in subs.items() if isinstance(v, type)}


def _decoder_class(cls: type) -> tuple[str, type] | None:
    """(path, class) of the config that holds the experts: the class itself, or its text_config."""
    if declares_experts(cls):
        return "", cls
    text = _sub_configs(cls).get("text_config")
    if text is not None and declares_experts(text):
        return "text_config", text
    return None


def _holds_experts(cls: type, depth: int = 0) -> bool:
    return declares_experts(cls) or depth < 3 and any(_holds_experts(s, depth + 1) for s in _sub_configs(cls).values())


@functools.lru_cache(maxsize=1)
def moe_families() -> tuple[Family, ...]:
    """Every transformers folder with a config class (or sub-config) that declares a routed-expert count."""
    from transformers.models.auto.configuration_auto import (CONFIG_MAPPING, CONFIG_MAPPING_NAMES,
                                                             model_type_to_module_name)

    import transformers.models as models_pkg

    root = Path(models_pkg.__file__).parent
    by_folder: dict[str, list[str]] = {}
    for model_type in CONFIG_MAPPING_NAMES:
        by_folder.setdefault(model_type_to_module_name(model_type), []).append(model_type)
    words = re.compile("|".join(EXPERT_COUNT_KEYS))
    out = []
    for folder, types in sorted(by_folder.items()):
        # a cheap look at the source first: importing all ~800 config modules takes seconds
        if not any(words.search(p.read_text(errors="replace")) for p in (root / folder).glob("configuration_*.py")):
            continue
        classes = {}
        for mt in types:
            try:
                classes[mt] = CONFIG_MAPPING[mt]
            except Exception:  # noqa: BLE001 - a model_type whose module fails to import is no family here
                continue
        if not any(_holds_experts(c) for c in classes.values()):
            continue
        model_type = _main_type(folder, classes)
        found = _decoder_class(classes[model_type])
        decoder = getattr(found[1], "model_type", "") or model_type if found else model_type
        out.append(Family(folder, model_type, decoder))
    return tuple(out)


def _main_type(folder: str, classes: dict[str, type]) -> str:
    """The model_type a checkpoint of the family carries: the folder's own name, else the config no
    other config of the folder nests."""
    for mt in classes:
        if mt.replace("-", "_") == folder:
            return mt
    nested = {sub for c in classes.values() for sub in _sub_configs(c).values()}
    tops = [mt for mt, c in classes.items() if c not in nested] or list(classes)
    return min(tops, key=lambda mt: (len(mt), mt))


def family(name: str) -> Family:
    for fam in moe_families():
        if fam.name == name:
            return fam
    raise KeyError(name)


# --- tiny configs ------------------------------------------------------------------------------------


def tiny_config(fam: Family) -> dict:
    """A few-thousand-parameter config.json of `fam`, from its own config class: the class's declared
    defaults with the sizes shrunk, instantiated (so derived keys agree with the shrunk ones) and
    written out whole, float32. A multimodal family keeps its wrapper (podplan plans the text_config)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[fam.model_type]
    found = _decoder_class(cls)
    if found is None or not found[0]:
        return dict(_tiny(cls), model_type=fam.model_type, torch_dtype="float32")
    path, text_cls = found
    # only the wrapper's identity and the decoder: its vision / audio towers are not planned
    return {"model_type": fam.model_type, "torch_dtype": "float32",
            path: dict(_tiny(text_cls), model_type=fam.decoder_type)}


def _tiny(cls: type) -> dict:
    """`cls`'s defaults, shrunk, as the config.json the class writes; the shrunk declared values alone
    if the class rejects them (the family then fails to load, which is its status)."""
    from planner.frontend.trace import quiet

    small = _shrink(fields(cls), cls)
    try:
        with quiet():
            out = cls(**small).to_dict()
    except Exception:  # noqa: BLE001 - transformers' validators raise any type; try_family reports it
        return {k: v for k, v in small.items() if _jsonable(v)}
    return {k: v for k, v in out.items() if k not in _DROP and _jsonable(v)}


# keys a config.json of a family does not carry (bookkeeping of the class, or the label maps of heads)
_DROP = ("transformers_version", "architectures", "auto_map", "_name_or_path", "id2label", "label2id")


def _jsonable(v: object) -> bool:
    try:
        json.dumps(v)
    except (TypeError, ValueError):
        return False
    return True


def _shrink(cfg: dict, cls: type) -> dict:
    out = {k: v for k, v in cfg.items() if k not in _DROP}
    stored = {v: k for k, v in aliases(cls).items()}  # d_model -> hidden_size
    layers_key = aliases(cls).get("num_hidden_layers", "num_hidden_layers")
    default_layers = out.get(layers_key)
    mla = isinstance(out.get("kv_lora_rank"), int)
    subs = _sub_configs(cls)
    for stored_key, val in list(out.items()):
        key = stored.get(stored_key, stored_key)
        if stored_key in subs and _holds_experts(subs[stored_key]):
            out[stored_key] = _tiny(subs[stored_key])  # DBRX keeps its experts in ffn_config
            continue
        if isinstance(val, bool):
            if _MOE_SWITCH.match(key):
                out[stored_key] = True
            continue
        if key in _TINY and (isinstance(val, int) or val is None and key in ("head_dim",)):
            out[stored_key] = _TINY[key]
        elif key in _TINY and isinstance(val, list) and key.endswith("token_id"):
            out[stored_key] = [_TINY[key]]
        elif key in EXPERT_COUNT_KEYS:
            out[stored_key] = TINY_EXPERTS
        elif key in TOP_K_KEYS:
            out[stored_key] = min(val, TINY_TOP_K) if isinstance(val, int) and val > 0 else TINY_TOP_K
        elif (INTERMEDIATE.search(key) or key == "ffn_hidden_size") and (isinstance(val, int) or val is None):
            out[stored_key] = 32 if ("moe" in key or "expert" in key) else 128
        elif INTERMEDIATE.search(key) and isinstance(val, list) and all(isinstance(v, int) for v in val):
            out[stored_key] = [32] * len(val)  # one size per modality (ERNIE-VL)
        elif SHARED_COUNT.match(key) and (val is None or isinstance(val, int) and val > 1):
            out[stored_key] = 1
        elif key in _MLA and (mla or val is not None) and val != 0:  # 0: a family without that part (NoPE)
            out[stored_key] = _MLA[key]
        elif key == "sliding_window" and isinstance(val, int) and val > 0:
            out[stored_key] = _TINY_WINDOW
        elif key == "first_k_dense_replace" and isinstance(val, int) and val > 0:
            out[stored_key] = 1  # one dense layer, then MoE: keeps the interleaving
    if mla:
        out["num_key_value_heads"] = out.get("num_attention_heads", 4)
    layers = _TINY_LAYERS
    for key, val in out.items():
        if isinstance(val, list) and default_layers and len(val) == default_layers:
            layers = max(layers, len(_distinct(val)))
    for key, val in list(out.items()):
        if isinstance(val, list) and default_layers and len(val) == default_layers:
            out[key] = _per_layer(val, layers)
        elif isinstance(val, dict) and val and all(str(k).isdigit() for k in val):
            # settings keyed by layer index (Gemma 4's per_layer_config): those of the layers kept
            out[key] = {k: v for k, v in val.items() if int(k) < layers}
    out[layers_key] = layers
    return out


def _distinct(values: list) -> list:
    seen: list = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen


def _per_layer(values: list, layers: int) -> list:
    """A per-layer list for `layers` layers with every kind of layer the family's default has, in order
    of first appearance (dense then MoE, sliding then full)."""
    kinds = _distinct(values)
    return (kinds + [kinds[-1]] * layers)[:layers]


# --- trying a family ---------------------------------------------------------------------------------


def try_config(src: ModelSource) -> str:
    """'' if `src` loads, builds on meta, traces and compiles through the stage-split pipeline;
    else the one-line error `podplan trace CONFIG --stages` prints."""
    from planner.frontend.shape import shape_from_traced
    from planner.frontend.stages import compile_stages
    from planner.frontend.trace import build_model, trace_model

    try:
        traced = trace_model(build_model(src, device="meta"), src)
        compile_stages(traced, shape_from_traced(traced), batch=1, seq=8)
    except PodplanError as exc:
        return str(exc)
    return ""


def try_family(fam: Family) -> FamilyStatus:
    src = ModelSource(name=fam.name, origin="tiny", config=tiny_config(fam))
    reason = try_config(src)
    return FamilyStatus(fam, not reason, reason)


def _cache_key() -> str:
    import transformers

    digest = hashlib.sha256(transformers.__version__.encode())
    here = Path(__file__).resolve().parents[2]
    for pkg in ("planner/frontend", "passes"):
        for path in sorted((here / pkg).rglob("*.py")):
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _cache_dir() -> Path:
    return Path(os.environ.get("PODPLAN_CACHE") or Path.home() / ".cache" / "podplan")


def statuses(*, refresh: bool = False) -> list[FamilyStatus]:
    """Every family's status, from the cache when podplan's frontend and transformers are unchanged."""
    path = _cache_dir() / f"families-{_cache_key()}.json"
    fams = moe_families()
    if not refresh:
        try:
            rows = json.loads(path.read_text())
            by_name = {r["family"]: r for r in rows}
            if set(by_name) == {f.name for f in fams}:
                return [FamilyStatus(f, by_name[f.name]["status"] == "traced", by_name[f.name]["reason"]) for f in fams]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    out = [try_family(f) for f in fams]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps([s.row() for s in out], indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: statuses are recomputed next time
    return out


# Refusal reasons by construct, for the coverage figures (`podplan models --families`, docs/families.md):
# (fragment of the one-line reason, group). First match wins.
_GROUPS = (
    ("has no causal-LM class", "no decoder-only causal-LM class in transformers (multimodal, encoder-decoder, encoder)"),
    ("linear-attention mixer", "state-space or linear-attention layers"),
    ("get_linear_cache", "state-space or linear-attention layers"),
    ("cache state beyond keys and values", "cache state beyond keys and values (sparse-attention indexer)"),
    ("torch.fx could not trace", "value-dependent control flow (torch.fx cannot trace)"),
    ("computes outside any stage", "routing state or constants outside the router module"),
    ("unrecognised", "module structure podplan does not recognise (hyper-connections, gated norms, MoE variants)"),
    ("no attention with query", "module structure podplan does not recognise (hyper-connections, gated norms, MoE variants)"),
    ("cannot read the model shape", "per-layer head counts or sizes"),
    ("cannot build a causal LM", "transformers cannot build the family from its own class's defaults"),
    ("invalid config", "transformers cannot build the family from its own class's defaults"),
)


def reason_group(reason: str) -> str:
    """The construct a refusal names, as a coverage group."""
    return next((group for fragment, group in _GROUPS if fragment in reason), "other")
