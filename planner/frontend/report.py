"""Plain-data summaries of a model for the CLI and the plan: the zoo listing and the per-layer trace table."""

from __future__ import annotations

from costmodels import opcount
from costmodels.model_shape import ModelShape
from passes import meta


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


def layer_rows(gm, shape: ModelShape) -> list[dict]:
    """Per decoder layer: roles, params, FLOPs/token and the attention<->MoE cut bytes/token (bf16).

    `gm` must carry `podplan.cost` (the annotate pass).
    """
    rows: dict[int, dict] = {}
    for node in gm.graph.nodes:
        layer = meta.layer_of(node)
        if layer is None:
            continue
        row = rows.setdefault(layer, {"layer": layer, "roles": set(), "params": 0, "flops_per_token": 0.0})
        cost = meta.cost_of(node)
        if meta.role_of(node) != "other":
            row["roles"].add(meta.role_of(node))
        row["params"] += cost.params
        row["flops_per_token"] += cost.flops_per_token
    moe = set(shape.moe_layers)
    out = []
    for layer in sorted(rows):
        row = rows[layer]
        is_moe = layer in moe
        row["roles"] = sorted(row["roles"])
        row["flops_per_token"] = round(row["flops_per_token"], 1)
        row["kind"] = "moe" if is_moe else "dense"
        # bf16 hidden states to each of the top-k experts (+ routing), weighted outputs back in bf16
        row["a2e_bytes_per_token"] = round(opcount.dispatch_bytes_per_token(shape, 2.0), 1) if is_moe else 0.0
        row["e2a_bytes_per_token"] = round(opcount.combine_bytes_per_token(shape, 2.0), 1) if is_moe else 0.0
        out.append(row)
    return out


def human_count(n: float) -> str:
    """1234567 -> '1.2M' (parameters, FLOPs)."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"
