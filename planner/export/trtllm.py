"""TensorRT-LLM: MoeLoadBalancerConfig as JSON, LLM-API options YAML and Python, and launch.sh.

initial_global_assignments is keyed by the decoder layer id of each MoE layer. TensorRT-LLM is a CUDA
engine: for a plan on other hardware the scripts name CUDA devices (the build notes the change). A
P/D-disaggregated plan also gets serve_disaggregated.sh: the `trtllm-serve disaggregated` YAML and command.
"""

from __future__ import annotations

from planner.export.exporter import Exporter, Files
from planner.export.groups import Group
from planner.export.render import json_bytes
from planner.ir import plan as ir


def _assignments(plan: ir.Plan, group: Group) -> list[tuple[int, list[int]]]:
    return [(layer, [int(e) for e in group.phy2log[i]]) for i, layer in enumerate(plan.model.moe_layers)]


def _balancer(plan: ir.Plan, group: Group) -> Files:
    config = {"num_slots": group.num_physical, "layer_updates_per_iter": 0,
              "initial_global_assignments": {str(layer): row for layer, row in _assignments(plan, group)}}
    return {"moe_load_balancer.json": json_bytes(config)}


EXPORTER = Exporter(
    name="trtllm",
    layer_ids="decoder layer ids of the MoE layers",
    built=("moe_load_balancer.json",),
    build=_balancer,
    templates={"moe_load_balancer.py": "moe_load_balancer.py.j2",
               "extra_llm_api_options.yaml": "trtllm_extra_options.yaml.j2",
               "launch.sh": "launch_trtllm.sh.j2"},
    context=lambda plan, group: {"assignments": _assignments(plan, group)},
    serve_templates={"serve_disaggregated.sh": "serve_trtllm_disaggregated.sh.j2"},
)
