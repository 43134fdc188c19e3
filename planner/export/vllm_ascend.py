"""vllm-ascend: its static expert map JSON (one entry per MoE layer and EP rank) and launch.sh."""

from __future__ import annotations

from planner.export.exporter import MOE_LAYERS, Exporter, Files
from planner.export.groups import Group
from planner.export.render import json_bytes
from planner.ir import plan as ir


def _expert_map(plan: ir.Plan, group: Group) -> Files:
    # layer_list counts MoE layers only; vllm-ascend offsets them by the dense layers itself
    spr = group.slots_per_rank
    layers = [
        {"layer_id": i, "device_count": group.ranks,
         "device_list": [{"device_id": r, "device_expert": [int(e) for e in row[r * spr:(r + 1) * spr]]}
                         for r in range(group.ranks)]}
        for i, row in enumerate(group.phy2log)
    ]
    return {"expert_map.json": json_bytes({"moe_layer_count": len(layers), "layer_list": layers})}


EXPORTER = Exporter(
    name="vllm-ascend",
    layer_ids=MOE_LAYERS,
    built=("expert_map.json",),
    build=_expert_map,
    templates={"launch.sh": "launch_vllm.sh.j2"},
    serve_templates={"proxy.sh": "proxy_vllm.sh.j2"},
)
