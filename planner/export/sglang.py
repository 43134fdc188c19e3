"""SGLang: `--init-expert-location` JSON (physical_to_logical_map, one row per decoder layer) and launch.sh."""

from __future__ import annotations

import numpy as np

from planner.export.checkpoint import SGLANG_EXPERT_LOCATION_ARCHITECTURES, architecture
from planner.export.exporter import Exporter, Files
from planner.export.groups import Group
from planner.export.platform import Platform
from planner.export.render import json_bytes
from planner.ir import plan as ir


def _expert_location(plan: ir.Plan, group: Group) -> Files:
    # SGLang sizes the map by config.num_hidden_layers: dense rows hold its trivial layout, p -> p % E
    m = plan.model
    rows = np.tile(np.arange(group.num_physical) % m.num_routed_experts, (m.num_layers, 1))
    for i, layer in enumerate(m.moe_layers):
        rows[layer] = group.phy2log[i]
    return {"expert_location.json": json_bytes({"physical_to_logical_map": rows.tolist()})}


def _notes(plan: ir.Plan, platform: Platform) -> list[str]:
    out = []
    if plan.aggregated and plan.workload.mtp_accept > 0:
        # server_args.py: EAGLE speculative decoding switches enable_mixed_chunk off
        out.append("SGLang mixes no prompt chunks into decode steps under MTP (EAGLE): the aggregated plan's prompt "
                   "chunks run as steps of their own, and its predicted TPOT and TTFT do not hold exactly")
    arch = architecture(plan.model)
    if arch not in SGLANG_EXPERT_LOCATION_ARCHITECTURES:
        out.append(f"SGLang's {arch or 'class for this model'} holds no redundant expert slots: launch.sh leaves the "
                   "expert layout to SGLang (no --init-expert-location); expert_location.json is the plan's, for reference")
    return out


EXPORTER = Exporter(
    name="sglang",
    layer_ids="decoder layers 0..num_layers-1 (dense rows unused)",
    built=("expert_location.json",),
    build=_expert_location,
    templates={"launch.sh": "launch_sglang.sh.j2"},
    notes=_notes,
    serve_templates={"router.sh": "router_sglang.sh.j2"},
)
