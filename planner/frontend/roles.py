"""Structural role recognition: which modules of a transformers model are attention, MoE, FFN...

Rules look at a module's children and parameter shapes, never at class names, so a new MoE
family with the standard structure (attention with q/o projections; a MoE block holding a
router and an expert container; optional shared-expert MLP) needs no new code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from planner.frontend.errors import ConfigError

ROLES = (
    "embed",
    "attention",
    "norm",
    "dense_ffn",
    "moe_gate",
    "routed_experts",
    "shared_experts",
    "lm_head",
    "other",
)

_OUT_PROJ_NAMES = {"o_proj", "out_proj", "wo", "dense", "c_proj"}


@dataclass(frozen=True)
class ModuleRoles:
    """Leaf modules of a model with their role and decoder-layer index (None outside layers)."""

    leaves: dict[str, tuple[str, int | None]]  # qualified name -> (role, layer)
    layers_path: str  # qualified name of the ModuleList of decoder layers
    num_layers: int
    moe_blocks: dict[int, str]  # layer -> qualified name of its MoE block
    experts: dict[int, str]  # layer -> qualified name of its expert container
    num_experts: int


def _linear_children(mod: nn.Module) -> dict[str, nn.Linear]:
    return {n: c for n, c in mod.named_children() if isinstance(c, nn.Linear)}


def is_attention(mod: nn.Module) -> bool:
    """A module with a query projection and an output projection among its linear children."""
    lin = _linear_children(mod)
    has_q = any(n.startswith("q") or "qkv" in n or "query" in n for n in lin)
    return has_q and any(n in _OUT_PROJ_NAMES for n in lin)


def is_mlp(mod: nn.Module) -> bool:
    """Two or more linear projections and nothing else with parameters."""
    lin = _linear_children(mod)
    if len(lin) < 2 or is_attention(mod):
        return False
    return all(isinstance(c, nn.Linear) or not any(True for _ in c.parameters()) for c in mod.children())


def expert_count(mod: nn.Module) -> int:
    """E if `mod` stores E experts (3-D weights sharing dim 0, or a ModuleList of MLPs), else 0."""
    if isinstance(mod, nn.ModuleList):
        return len(mod) if len(mod) >= 2 and all(is_mlp(c) for c in mod) else 0
    params = list(mod.parameters(recurse=False))
    # 3-D weights [E, in, out], and per-expert biases [E, out] beside them (gpt-oss)
    if not any(p.ndim == 3 for p in params) or any(p.ndim not in (2, 3) for p in params):
        return 0
    lead = {p.shape[0] for p in params}
    return lead.pop() if len(lead) == 1 else 0


def _router_child(mod: nn.Module, num_experts: int, skip: str) -> str | None:
    for name, child in mod.named_children():
        if name == skip:
            continue
        params = list(child.parameters())
        weights = [p for p in params if p.ndim == 2 and p.shape[0] == num_experts and p.shape[1] > 1]
        # besides its [E, hidden] weight a router may hold per-expert routing state: a bias or a
        # score-correction bias of E values ([E] or [1, E], ERNIE 4.5's moe_statics)
        if len(weights) == 1 and all(p is weights[0] or p.numel() <= num_experts for p in params):
            return name
    return None


def _moe_parts(mod: nn.Module) -> tuple[str, str, int] | None:
    """(router child, expert container child, E) if `mod` is a MoE block."""
    for name, child in mod.named_children():
        e = expert_count(child)
        if e:
            router = _router_child(mod, e, skip=name)
            if router is not None:
                return router, name, e
    return None


def _is_norm(mod: nn.Module) -> bool:
    params = list(mod.parameters(recurse=False))
    return not list(mod.children()) and bool(params) and all(p.ndim == 1 for p in params)


# Parameters of a recurrent (state-space / linear-attention) mixer: Mamba's A_log and dt_bias, gated
# DeltaNet's and KDA's; with a causal Conv1d beside them. Their state is not a KV cache podplan can split.
_RECURRENT_PARAMS = ("A_log", "dt_bias")


def recurrent_mixer(mod: nn.Module) -> bool:
    """A state-space or linear-attention mixer: a causal Conv1d or a decay parameter (A_log, dt_bias)."""
    if any(isinstance(m, nn.Conv1d) for m in mod.modules()):
        return True
    return any(name.rsplit(".", 1)[-1] in _RECURRENT_PARAMS for name, _ in mod.named_parameters())


def _refuse_recurrent(path: str, mod: nn.Module) -> None:
    raise ConfigError(
        f"{path} ({type(mod).__name__}): a state-space / linear-attention mixer (recurrent state, causal convolution) "
        "in a decoder layer; podplan plans softmax-attention decoders whose only state is a KV cache"
    )


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and any(is_attention(m) for m in mod[0].modules()):
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        _explain_no_layers(model)
        raise ConfigError(
            f"{type(model).__name__}: no list of decoder layers with attention (q/o projections) found; "
            "podplan needs a standard decoder-only transformer"
        )
    return best


def _explain_no_layers(model: nn.Module) -> None:
    """Name the construct when no layer list starts with attention: a hybrid whose first layer is a
    state-space mixer (Jamba, Nemotron-H), or attention that is not q/o projections (JetMoE's mixture of heads)."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 1
             and all(any(True for _ in c.children()) for c in m)]
    if not lists:
        return
    name, layers = max(lists, key=lambda item: len(item[1]))
    for idx, layer in enumerate(layers):
        for child_name, child in layer.named_children():
            if recurrent_mixer(child):
                _refuse_recurrent(f"{name}.{idx}.{child_name}", child)
    first = next(iter(layers[0].named_children()), None)
    if first is not None:
        raise ConfigError(
            f"{name}.0 ({type(layers[0]).__name__}): no attention with query and output projections in the decoder "
            f"layers (their parts: {', '.join(f'{n} ({type(c).__name__})' for n, c in layers[0].named_children())}); "
            "podplan needs softmax attention + FFN per layer"
        )


def recognise(model: nn.Module) -> ModuleRoles:
    """Assign a role to every module the tracer keeps as a leaf, or fail naming the module."""
    layers_path, layers = _decoder_layers(model)
    leaves: dict[str, tuple[str, int | None]] = {}
    moe_blocks: dict[int, str] = {}
    experts: dict[int, str] = {}
    num_experts = 0
    embed_rows = None

    for idx, layer in enumerate(layers):
        prefix = f"{layers_path}.{idx}"
        ffn_found = attn_found = False
        for name, child in layer.named_children():
            path = f"{prefix}.{name}"
            if recurrent_mixer(child):
                _refuse_recurrent(path, child)
            if is_attention(child):
                leaves[path] = ("attention", idx)
                attn_found = True
            elif (parts := _moe_parts(child)) is not None:
                router, container, e = parts
                num_experts = max(num_experts, e)
                moe_blocks[idx] = path
                experts[idx] = f"{path}.{container}"
                leaves[f"{path}.{router}"] = ("moe_gate", idx)
                leaves[f"{path}.{container}"] = ("routed_experts", idx)
                for sub, mod in child.named_children():
                    if sub in (router, container):
                        continue
                    if not any(True for _ in mod.parameters()):
                        leaves[f"{path}.{sub}"] = ("other", idx)
                        continue
                    if not (is_mlp(mod) or isinstance(mod, nn.Linear)):
                        raise ConfigError(
                            f"{path}.{sub} ({type(mod).__name__}): unrecognised part of a MoE block; "
                            "expected a router, an expert container or a shared-expert MLP"
                        )
                    leaves[f"{path}.{sub}"] = ("shared_experts", idx)
                ffn_found = True
            elif is_mlp(child):
                leaves[path] = ("dense_ffn", idx)
                ffn_found = True
            elif _is_norm(child):
                leaves[path] = ("norm", idx)
            elif not any(True for _ in child.parameters()):
                leaves[path] = ("other", idx)
            else:
                raise ConfigError(
                    f"{path} ({type(child).__name__}): unrecognised structure in a decoder layer; expected "
                    "attention (q/o projections), a MoE block (router + experts), an MLP or a norm"
                )
        if not attn_found or not ffn_found:
            missing = "attention" if not attn_found else "FFN (MLP or MoE block)"
            raise ConfigError(
                f"{prefix} ({type(layer).__name__}): no {missing} recognised in this decoder layer; "
                "podplan needs attention + FFN per layer"
            )

    # Outside the layers: embeddings, final norm, lm_head, rotary embeddings.
    for name, mod in model.named_modules():
        if name.startswith(layers_path) or name in leaves:
            continue
        if isinstance(mod, nn.Embedding):
            leaves[name] = ("embed", None)
            embed_rows = mod.num_embeddings
    for name, mod in model.named_modules():
        if name.startswith(layers_path) or name in leaves or not name:
            continue
        if isinstance(mod, nn.Linear) and mod.out_features == embed_rows:
            leaves[name] = ("lm_head", None)
        elif _is_norm(mod):
            leaves[name] = ("norm", None)
        elif not list(mod.children()) and not any(True for _ in mod.parameters()):
            leaves[name] = ("other", None)
    if not moe_blocks:
        raise ConfigError(
            # the class the user's config names, not the frontend's wrapper around it
            f"{type(getattr(model, 'lm', model)).__name__}: dense model (no MoE block found in any layer); podplan plans "
            "Mixture-of-Experts models: give a MoE config"
        )
    return ModuleRoles(leaves, layers_path, len(layers), moe_blocks, experts, num_experts)
