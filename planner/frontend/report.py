"""Plain-data summaries of a model for the CLI: the zoo listing (stage facts come from the stage-split pipeline: planner.compile.stage_table)."""

from __future__ import annotations

from costmodels.model_shape import ModelShape


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


def human_count(n: float) -> str:
    """1234567 -> '1.2M' (parameters, FLOPs)."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"
