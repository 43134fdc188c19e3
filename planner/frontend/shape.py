"""Build a `ModelShape` (what cost models need) from a traced transformers model.

Parameter counts are summed over the real modules by role; attention dimensions come from
the config (the modules hide head counts inside their projections).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn as nn

from costmodels.model_shape import ModelShape
from planner.frontend.errors import ConfigError
from planner.frontend.trace import CausalLMRoot, Traced, build_model, first_line
from planner.frontend.roles import ModuleRoles, recognise
from planner.frontend.zoo import ModelSource, load_source

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedModel


def _numel(mod: nn.Module) -> int:
    return sum(p.numel() for p in mod.parameters())


def shape_from_traced(traced: Traced) -> ModelShape:
    """Exact parameter counts by role plus the config's attention dimensions."""
    # Count on the model, not on gm: the trace drops modules the forward never calls (e.g. a
    # rotary embedding a family builds but replaces), and roles name every module the model has.
    return _checked(CausalLMRoot(traced.model), traced.roles, traced.model, traced.config, traced.source)


def shape_of(model_name: str) -> ModelShape:
    """The ModelShape of a bundled name or config path, without tracing (meta build only)."""
    src = load_source(model_name)
    return shape_of_model(build_model(src), src)


def shape_of_model(model: PreTrainedModel, src: ModelSource) -> ModelShape:
    """The ModelShape of a built model (any device), without tracing."""
    root = CausalLMRoot(model)
    return _checked(root, recognise(root), model, model.config, src)


def _checked(root: nn.Module, roles: ModuleRoles, model: nn.Module, cfg: PreTrainedConfig,
             source: ModelSource) -> ModelShape:
    """`_shape`, with a config whose attention dimensions podplan cannot read as one line: a family
    whose head counts vary per layer (DOTS-3's per_layer_config) has no single value to read."""
    try:
        return _shape(root, roles, model, cfg, source)
    except Exception as exc:  # noqa: BLE001 - transformers' per-layer configs raise their own error types
        raise ConfigError(f"{source.name}: cannot read the model shape of {type(model).__name__} from its config "
                          f"({type(exc).__name__}: {first_line(exc)}); podplan needs one head count and size for "
                          "every layer") from None


def _shape(root: nn.Module, roles: ModuleRoles, model: nn.Module, cfg: PreTrainedConfig,
           source: ModelSource) -> ModelShape:
    per_layer: dict[tuple[str, int | None], int] = {}
    for path, (role, layer) in roles.leaves.items():
        key = (role, layer)
        per_layer[key] = per_layer.get(key, 0) + _numel(root.get_submodule(path))

    moe_layers = tuple(sorted(roles.moe_blocks))
    dense_layers = [i for i in range(roles.num_layers) if i not in roles.moe_blocks]
    ref_moe = moe_layers[-1]
    hidden = int(cfg.hidden_size)
    E = roles.num_experts
    params_expert = per_layer.get(("routed_experts", ref_moe), 0) // E
    params_shared = per_layer.get(("shared_experts", ref_moe), 0)
    params_dense = per_layer.get(("dense_ffn", dense_layers[0]), 0) if dense_layers else 0
    params_attn = per_layer.get(("attention", ref_moe), 0) + per_layer.get(("norm", ref_moe), 0)
    top_k = int(getattr(cfg, "num_experts_per_tok", 0) or 0)

    total = sum(p.numel() for p in model.parameters())
    inactive = sum(
        per_layer.get(("routed_experts", layer), 0) // E * (E - top_k) for layer in moe_layers
    )
    heads = int(cfg.num_attention_heads)
    mla = getattr(cfg, "kv_lora_rank", None) is not None
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
    if mla:
        head_dim = int(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    window, sliding = _sliding(cfg, roles.num_layers)
    return ModelShape(
        name=source.name,
        num_layers=roles.num_layers,
        moe_layers=moe_layers,
        hidden=hidden,
        vocab=int(cfg.vocab_size),
        attention="mla" if mla else "gqa",
        num_heads=heads,
        num_kv_heads=1 if mla else int(getattr(cfg, "num_key_value_heads", None) or heads),
        head_dim=head_dim,
        q_lora_rank=int(getattr(cfg, "q_lora_rank", 0) or 0) if mla else 0,
        kv_lora_rank=int(cfg.kv_lora_rank) if mla else 0,
        qk_rope_head_dim=int(cfg.qk_rope_head_dim) if mla else 0,
        qk_nope_head_dim=int(cfg.qk_nope_head_dim) if mla else 0,
        v_head_dim=int(cfg.v_head_dim) if mla else 0,
        # gated MLPs hold 3 matrices of hidden x intermediate
        dense_intermediate=params_dense // (3 * hidden),
        moe_intermediate=params_expert // (3 * hidden),
        num_routed_experts=E,
        # DeepSeek counts its shared experts (n_shared_experts); Qwen2-MoE, dots1 and kin hold one shared
        # MLP (possibly gated) and carry no count: that is one shared expert
        num_shared_experts=(int(getattr(cfg, "n_shared_experts", None) or getattr(cfg, "num_shared_experts", None)
                                or 1) if params_shared else 0),
        shared_intermediate=params_shared // (3 * hidden),
        top_k=top_k,
        params_total=total,
        params_active=total - inactive,
        params_attention=params_attn,
        params_dense_ffn=params_dense,
        params_expert=params_expert,
        params_shared=params_shared,
        params_gate=per_layer.get(("moe_gate", ref_moe), 0),
        params_embed=per_layer.get(("embed", None), 0),
        params_head=per_layer.get(("lm_head", None), 0) + per_layer.get(("norm", None), 0),
        sliding_window=window,
        sliding_layers=sliding,
    )


def _sliding(cfg: PreTrainedConfig, num_layers: int) -> tuple[int, int]:
    """Window and number of sliding-window layers, as transformers' mask functions decide them: per
    `layer_types` where the config has them (gpt-oss, Qwen2-MoE, Cohere2), else every layer when a
    window is set (Mixtral, Mistral)."""
    window = int(getattr(cfg, "sliding_window", None) or 0)
    if window <= 0:
        return 0, 0
    types = getattr(cfg, "layer_types", None)
    if types:
        layers = sum(1 for t in types[:num_layers] if "sliding" in str(t))
    else:
        layers = num_layers if getattr(cfg, "use_sliding_window", True) is not False else 0
    return (window if layers else 0), layers


def model_row(shape: ModelShape) -> dict:
    """One model's headline numbers (what `podplan models` lists)."""
    return {
        "name": shape.name,
        "params_total": shape.params_total,
        "params_active": shape.params_active,
        "num_layers": shape.num_layers,
        "num_moe_layers": shape.num_moe_layers,
        "num_routed_experts": shape.num_routed_experts,
        "num_shared_experts": shape.num_shared_experts,
        "top_k": shape.top_k,
        "hidden": shape.hidden,
        "attention": shape.attention,
    }
