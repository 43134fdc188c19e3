"""TensorRT-LLM: MoeLoadBalancerConfig as JSON, LLM-API options YAML and Python, and launch.sh.

initial_global_assignments is keyed by the decoder layer id of each MoE layer.
"""

from __future__ import annotations

from planner.export.exporter import Exporter, Files
from planner.export.groups import Group
from planner.export.platform import CUDA, Platform
from planner.export.render import json_bytes
from planner.ir import plan as ir


def _assignments(plan: ir.Plan, group: Group) -> list[tuple[int, list[int]]]:
    return [(layer, [int(e) for e in group.phy2log[i]]) for i, layer in enumerate(plan.model.moe_layers)]


def _balancer(plan: ir.Plan, group: Group) -> Files:
    config = {"num_slots": group.num_physical, "layer_updates_per_iter": 0,
              "initial_global_assignments": {str(layer): row for layer, row in _assignments(plan, group)}}
    return {"moe_load_balancer.json": json_bytes(config)}


def _notes(plan: ir.Plan, platform: Platform) -> list[str]:
    if platform == CUDA:
        return []
    return [f"TensorRT-LLM runs on {CUDA.label}, not {plan.topology.hardware}; the files keep the plan's layout "
            "for a GPU cluster of the same shape"]


EXPORTER = Exporter(
    name="trtllm",
    layer_ids="decoder layer ids of the MoE layers",
    built=("moe_load_balancer.json",),
    build=_balancer,
    templates={"moe_load_balancer.py": "moe_load_balancer.py.j2",
               "extra_llm_api_options.yaml": "trtllm_extra_options.yaml.j2",
               "launch.sh": "launch_trtllm.sh.j2"},
    context=lambda plan, group: {"assignments": _assignments(plan, group)},
    notes=_notes,
)
