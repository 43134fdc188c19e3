"""Frontend: build a transformers model from a config (meta device) and trace it with torch.fx.

The tracer keeps attention, routers, expert containers, shared experts, dense MLPs, norms
and embeddings as leaf modules (found structurally by `planner.frontend.roles`), so the traced graph
shows exactly the wiring between them: residual adds, the MoE block's gate -> experts
(+ shared experts) and the head.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast
from unittest import mock

import torch
import torch.fx as fx
import torch.nn as nn

from planner.frontend import config_keys
from planner.frontend.errors import ConfigError
from costmodels.model_shape import ModelShape
from passes import meta
from planner.frontend.roles import ModuleRoles, recognise
from planner.frontend.zoo import ModelSource, load_source

if TYPE_CHECKING:  # transformers is imported lazily (check_transformers first); types only here
    from transformers import PreTrainedConfig, PreTrainedModel

TRANSFORMERS_VERSION = "5.23.0"  # the hooks below depend on v5 internals; see check_transformers()

# model_types that name a transformers family under another name. Kimi K2 ships "kimi_k2" only so
# engines can tell it apart; its weights and code are DeepSeek-V3's, and Moonshot's deployment
# guide (docs/deploy_guidance.md of moonshotai/Kimi-K2-Instruct) says to run it as "deepseek_v3".
MODEL_TYPE_ALIASES = {"kimi_k2": "deepseek_v3"}


def check_transformers() -> None:
    """Fail loudly if the installed transformers is not the one the tracer hooks were written for."""
    import transformers

    if transformers.__version__ != TRANSFORMERS_VERSION:
        raise ConfigError(
            f"transformers {transformers.__version__} is installed; podplan's tracer is pinned to "
            f"{TRANSFORMERS_VERSION} (it patches v5 internals): install transformers=={TRANSFORMERS_VERSION}"
        )


def language_config(src: ModelSource) -> dict:
    """The decoder's config as transformers builds it: a multimodal config's `text_config`, with a
    renamed model_type mapped to the family it runs as (MODEL_TYPE_ALIASES, then `architectures`).

    The plan keeps the user's file as given (its digest is the model identity); only the build sees this.
    """
    cfg = dict(src.config)
    inner = cfg.get("text_config")
    if isinstance(inner, dict) and "hidden_size" not in cfg:
        # a vision-language checkpoint (Kimi K2.5, Qwen3-VL-MoE, Llama 4): podplan plans its decoder
        outer = cfg
        cfg = dict(inner)
        for key in ("torch_dtype", "dtype"):
            if key not in cfg and key in outer:
                cfg[key] = outer[key]
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str):
        return cfg
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type in CONFIG_MAPPING_NAMES:
        return cfg
    if model_type in MODEL_TYPE_ALIASES:
        cfg["model_type"] = MODEL_TYPE_ALIASES[model_type]
        return cfg
    by_class = {cls: mt for mt, cls in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()
                if isinstance(cls, str) and mt in CONFIG_MAPPING_NAMES}
    for arch in cfg.get("architectures") or []:
        if isinstance(arch, str) and arch in by_class:
            cfg["model_type"] = by_class[arch]  # a renamed family whose class transformers has
            break
    return cfg


def validate_config(src: ModelSource) -> None:
    """Checks with one-line messages, before transformers sees the config: the family is a causal LM
    transformers has; the keys of the MoE shape are there (as the family's config class spells them:
    a default of the class describes some other model, so none is filled in) and hold whole numbers."""
    cfg = language_config(src)
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ConfigError(f"{src.name}: config has no 'model_type' string (got {model_type!r}); add the family's "
                          "model_type, e.g. \"qwen3_moe\"")
    cls = _config_class(model_type)
    if cls is None:
        raise ConfigError(f"{src.name}: unsupported architecture '{model_type}': transformers {TRANSFORMERS_VERSION} "
                          "has no such model_type; use a MoE family transformers implements (`podplan models --families`)")
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        # a multimodal decoder, an encoder-decoder or an encoder: transformers has no decoder-only LM to build
        raise ConfigError(
            f"{src.name}: transformers {TRANSFORMERS_VERSION} has no causal-LM class for {cls.__name__} (model_type "
            f"'{model_type}', in transformers.models.{cls.__module__.split('.')[-2]}); podplan plans decoder-only "
            "causal LMs")
    for key, val in cfg.items():
        _check_number(src.name, key, val)
    for spellings in config_keys.moe_shape_keys(cls):
        if not any(k in cfg for k in spellings):
            named = " or ".join(f"'{k}'" for k in spellings)
            raise ConfigError(f"{src.name}: config has no {named}; add it ({model_type} configs must give the MoE "
                              "shape: hidden size, layer count, heads, vocabulary, expert count, top-k, intermediate "
                              "sizes; podplan does not fill them from the family's defaults)")
    amap = config_keys.aliases(cls)
    for key in config_keys.REQUIRED:
        if key not in cfg and amap.get(key, key) not in cfg:
            continue  # a key this family's class derives (checked present above where it declares it)
        val = cfg.get(key, cfg.get(amap.get(key, key)))
        if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
            raise ConfigError(f"{src.name}: '{key}' must be a positive integer, got {val!r}")
    experts = next((cfg[k] for k in config_keys.EXPERT_COUNT_KEYS if isinstance(cfg.get(k), int)), None)
    top_k = next((cfg[k] for k in config_keys.TOP_K_KEYS if isinstance(cfg.get(k), int)), None)
    if experts is not None and isinstance(top_k, int) and top_k > experts:
        raise ConfigError(
            f"{src.name}: num_experts_per_tok={top_k} exceeds the {experts} routed experts; top-k must be <= experts"
        )
    if isinstance(top_k, int) and top_k <= 0:
        raise ConfigError(f"{src.name}: num_experts_per_tok must be >= 1, got {top_k}")


def _config_class(model_type: str) -> type | None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        return CONFIG_MAPPING[model_type]
    except Exception:  # noqa: BLE001 - KeyError for an unknown type, ImportError for a family that fails to import
        return None


def _check_number(name: str, key: str, val: object) -> None:
    """A MoE-shape key holds a whole number (or null): not a string, a list, a fraction or a boolean."""
    if not config_keys.shape_int_key(key) or val is None:
        return
    if isinstance(val, bool) or not isinstance(val, (int, float)):
        what = {str: "a string", list: "a list", dict: "an object", bool: "a boolean"}.get(type(val), type(val).__name__)
        hint = f"; write {val}" if isinstance(val, str) and val.strip().isdigit() else ""
        raise ConfigError(f"{name}: '{key}' must be a whole number, got {val!r} ({what}){hint}")
    if isinstance(val, float) and not val.is_integer():
        raise ConfigError(f"{name}: '{key}' must be a whole number, got {val!r}")


def build_config(src: ModelSource):
    """A transformers PretrainedConfig for `src`, eager attention, batched_mm experts."""
    check_transformers()
    validate_config(src)
    from transformers import AutoConfig

    # a deep copy: transformers normalises nested values in place (rope_scaling gains rope_type), which
    # would change src.digest(), the identity plans and the runtime compare
    cfg = copy.deepcopy(language_config(src))
    model_type = cfg.pop("model_type")
    for key in ("architectures", "auto_map", "quantization_config", "transformers_version"):
        cfg.pop(key, None)
    try:
        with quiet():
            config = AutoConfig.for_model(model_type, **cfg)
    except ValueError as exc:
        if "Unrecognized model" in str(exc) or "model_type" in str(exc):
            raise ConfigError(
                f"{src.name}: unsupported architecture '{model_type}': transformers {TRANSFORMERS_VERSION} has no "
                "such model_type; use a MoE family transformers implements"
            ) from None
        raise ConfigError(f"{src.name}: invalid config: {first_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - transformers' validators raise their own types: one line, never a traceback
        raise ConfigError(f"{src.name}: invalid config ({type(exc).__name__}: {first_line(exc)}); check it against "
                          "the model card") from None
    # eager attention: an explicit additive mask, exact against the reference; batched_mm experts:
    # has meta kernels (eager's nonzero has none) and works in fp32 (grouped_mm wants bf16 on meta).
    config._attn_implementation = "eager"
    config._experts_implementation = "batched_mm"
    config.use_cache = False
    return config


def first_line(exc: BaseException) -> str:
    """The first line of an error's message; its cause's when the message only introduces it (huggingface_hub's
    validators raise 'Class validation error for validator ...:' from the ValueError that says what is wrong)."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    if first.endswith(":") and exc.__cause__ is not None:
        return first_line(exc.__cause__)
    return first


@contextlib.contextmanager
def quiet():
    """Silence transformers' warnings and log lines while it builds: podplan reports problems itself, in one
    line, and a config remark printed on stderr would break that contract."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


def _dtype_of(src: ModelSource) -> torch.dtype:
    cfg = language_config(src)
    name = cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(str(name), torch.bfloat16)


def build_model(src: ModelSource, *, device: str = "meta", dtype: torch.dtype | None = None,
                seed: int = 0) -> PreTrainedModel:
    """Instantiate transformers' causal-LM class for `src`: no memory on meta, seeded weights elsewhere."""
    from transformers import AutoModelForCausalLM

    config = build_config(src)
    dtype = dtype or _dtype_of(src)
    ctx = torch.device(device)
    try:
        torch.manual_seed(seed)
        with ctx, quiet():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - transformers' constructors raise any type: one line, never a traceback
        # a config transformers accepts but its modules cannot be built from (a pad id outside the
        # vocabulary, a missing per-layer list): the config is wrong, not podplan
        raise ConfigError(
            f"{src.name}: transformers cannot build a causal LM for '{src.config['model_type']}' from this config "
            f"({type(exc).__name__}: {first_line(exc)}); check the config against the model card"
        ) from None
    model.eval()
    return model


# --- tracing -----------------------------------------------------------------------------------


def podplan_causal_mask(
    inputs_embeds: torch.Tensor, position_ids: torch.Tensor | None, sliding_window: int, past_len: int = 0
) -> torch.Tensor:
    """Additive causal mask [B, 1, S, past_len + S] of tensors only (HF's create_causal_mask branches in Python).

    Same values as transformers' eager mask: 0 where a query may attend a key, finfo(dtype).min
    elsewhere; sliding_window <= 0 means no window. `past_len` cached keys precede the S new ones
    (the kv-cache pass and the runtime pass it; the traced graph leaves it 0). Families that build
    the mask without position ids (gpt-oss) get the new tokens' positions past_len .. past_len + S - 1.
    """
    if position_ids is None:
        position_ids = torch.arange(past_len, past_len + inputs_embeds.shape[1], device=inputs_embeds.device)[None, :]
    q_pos = position_ids[:, :, None]  # [B|1, S, 1]
    k_pos = torch.arange(past_len + inputs_embeds.shape[1], device=inputs_embeds.device)[None, None, :]
    allowed = k_pos <= q_pos
    if sliding_window > 0:
        allowed = allowed & (k_pos > q_pos - sliding_window)
    neg = torch.finfo(inputs_embeds.dtype).min
    mask = torch.zeros(allowed.shape, dtype=inputs_embeds.dtype, device=inputs_embeds.device).masked_fill(~allowed, neg)
    return mask[:, None, :, :].expand(inputs_embeds.shape[0], 1, mask.shape[-2], mask.shape[-1])


fx.wrap("podplan_causal_mask")


def _mask_shim(config=None, inputs_embeds=None, position_ids=None, **_: object):
    return podplan_causal_mask(inputs_embeds, position_ids, 0)


def _sliding_mask_shim(config=None, inputs_embeds=None, position_ids=None, **_: object):
    return podplan_causal_mask(inputs_embeds, position_ids, int(getattr(config, "sliding_window", 0) or 0))


class CausalLMRoot(nn.Module):
    """Plain root for tracing: HF forwards are wrapped in (*args, **kwargs) decorators."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits


class LeafTracer(fx.Tracer):
    """Keeps the recognised role modules (and torch.nn builtins) as leaves.

    It also carries an example value beside every proxy (run on the model's own device: meta
    for planning), only so that `*x.shape` and tuple unpacking know their length; the graph
    itself stays shape-generic (getitem nodes, no baked-in sizes).
    """

    def __init__(self, leaves: set[str], example_inputs: dict[str, torch.Tensor]):
        super().__init__()
        self.leaves = leaves
        self.example_inputs = example_inputs
        self.values: dict[fx.Node, object] = {}
        self._eager = False  # True while computing an example: module calls run for real

    def call_module(self, m, forward, args, kwargs):
        if self._eager:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._eager:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or super().is_leaf_module(m, module_qualified_name)

    def _example(self, kind: str, target, args, kwargs) -> object:
        a, k = fx.node.map_aggregate((args, kwargs), lambda x: self.values.get(x.node, _UNKNOWN) if isinstance(x, fx.Proxy) else x)
        if kind == "placeholder":
            return self.example_inputs.get(target, _UNKNOWN)
        if kind == "get_attr":
            return fx.graph_module._get_attr(self.root, target) if hasattr(fx.graph_module, "_get_attr") else _UNKNOWN
        flat = fx.node.map_aggregate((a, k), lambda x: x)
        if any(v is _UNKNOWN for v in _flatten(flat)):
            return _UNKNOWN
        self._eager = True
        try:
            return self._run(kind, target, a, k)
        finally:
            self._eager = False

    def _run(self, kind: str, target, a, k) -> object:
        with torch.no_grad():
            if kind == "call_function":
                return target(*a, **k)
            if kind == "call_method":
                return getattr(a[0], target)(*a[1:], **k)
            if kind == "call_module":
                return self.root.get_submodule(target)(*a, **k)
        return _UNKNOWN

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if self._eager:
            raise AssertionError(f"graph node created while computing an example value: {kind} {target}")
        try:
            self.values[proxy.node] = self._example(kind, target, args, kwargs)
        except Exception:  # noqa: BLE001 - an example we cannot compute only disables length inference
            self.values[proxy.node] = _UNKNOWN
        return proxy

    def length(self, obj: fx.Proxy) -> int | None:
        val = self.values.get(obj.node, _UNKNOWN)
        return len(val) if val is not _UNKNOWN and hasattr(val, "__len__") else None

    def iter(self, obj: fx.Proxy):
        n = self.length(obj)
        if n is None:
            return super().iter(obj)
        # Proxy gets __getitem__ (like its other operator methods) by setattr at import, so torch's
        # stub does not list it; at run time this records a getitem node per element.
        return iter([obj[i] for i in range(n)])  # type: ignore[index]


_proxy_len = fx.Proxy.__len__


def _known_len(self: fx.Proxy) -> int:
    """Proxy.__len__ that answers from the example value (`f(*x.shape)` asks for it)."""
    n = self.tracer.length(self) if isinstance(self.tracer, LeafTracer) else None
    return _proxy_len(self) if n is None else n


class _Unknown:
    pass


_UNKNOWN = _Unknown()


def _flatten(x) -> list:
    if isinstance(x, (list, tuple)):
        return [y for item in x for y in _flatten(item)]
    if isinstance(x, dict):
        return [y for item in x.values() for y in _flatten(item)]
    return [x]


@dataclass
class Traced:
    """A traced model: the graph module, what each leaf is, and the source it came from."""

    gm: fx.GraphModule
    roles: ModuleRoles  # qualified names are relative to gm (prefixed with "lm.")
    source: ModelSource
    model: nn.Module  # the transformers model traced (shares parameters with gm)

    @property
    def config(self) -> PreTrainedConfig:
        """The traced transformers model's config; family keys (kv_lora_rank, ...) read as Any."""
        # nn.Module.__getattr__ types `.config` as Tensor | Module; `model` is declared nn.Module
        # because runtime ranks may keep a stub-holding GraphModule there, which has no config.
        return cast("PreTrainedConfig", self.model.config)


def _patched_masks(model: nn.Module):
    stack = contextlib.ExitStack()
    mods = {sys.modules[type(m).__module__] for m in model.modules()}
    for mod in mods:
        if hasattr(mod, "create_causal_mask"):
            stack.enter_context(mock.patch.object(mod, "create_causal_mask", _mask_shim))
        if hasattr(mod, "create_sliding_window_causal_mask"):
            stack.enter_context(mock.patch.object(mod, "create_sliding_window_causal_mask", _sliding_mask_shim))
    return stack


def _node_module(node: fx.Node, leaves: dict[str, tuple[str, int | None]]) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] if isinstance(v, tuple) else str(v) for v in stack.values()]
    return paths[-1] if paths else ""


def _layer_from_path(path: str, layers_path: str) -> int | None:
    prefix = layers_path + "."
    if not path.startswith(prefix):
        return None
    head = path[len(prefix) :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def trace_model(model: nn.Module, src: ModelSource) -> Traced:
    """Trace `model` with the leaf tracer; tag every node with role, layer and module path."""
    root = CausalLMRoot(model)
    roles = recognise(root)
    device = next(model.parameters()).device
    example = {"input_ids": torch.zeros((1, 4), dtype=torch.long, device=device)}
    tracer = LeafTracer(set(roles.leaves), example)
    try:
        with _patched_masks(model), mock.patch.object(fx.Proxy, "__len__", _known_len), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = tracer.trace(root)
    except Exception as exc:  # noqa: BLE001 - a new HF release breaking the tracer must say so in one line
        raise ConfigError(
            f"{src.name}: torch.fx could not trace {type(model).__name__} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); this family's forward has unsupported control flow"
        ) from None
    gm = fx.GraphModule(root, graph, class_name="TracedCausalLM")
    for node in gm.graph.nodes:
        path = _node_module(node, roles.leaves)
        role, layer = roles.leaves.get(path, (None, None))
        if role is None:
            layer = _layer_from_path(path, roles.layers_path)
            role = "other"
        node.meta[meta.ROLE] = role
        node.meta[meta.LAYER] = layer
        node.meta[meta.MODULE] = path
    return Traced(gm=gm, roles=roles, source=src, model=model)


def trace(model_name: str, *, device: str = "meta", seed: int = 0, dtype: torch.dtype | None = None) -> Traced:
    """Load, build and trace a model by bundled name or config path."""
    src = load_source(model_name)
    model = build_model(src, device=device, seed=seed, dtype=dtype)
    return trace_model(model, src)


def model_shape(model_name: str) -> ModelShape:
    """The cost models' view of a model (bundled name or config path), built on meta in ~1 s."""
    from planner.frontend.shape import shape_of

    return shape_of(model_name)
