"""vLLM: its EplbState tensors (JSON and .pt, for a loader hook) and launch.sh with --enable-eplb."""

from __future__ import annotations

import io

from planner.export.exporter import MOE_LAYERS, Exporter, Files
from planner.export.groups import Group, eplb_tensors, log2phy
from planner.export.platform import NPU, Platform
from planner.export.render import json_bytes
from planner.ir import plan as ir


def _eplb_state(plan: ir.Plan, group: Group) -> Files:
    import torch  # lazy: only this format writes a .pt

    E = plan.model.num_routed_experts
    redundant = group.num_physical - E
    phy2log, _, logcnt = eplb_tensors(plan, group)
    # vLLM pads logical_to_physical_map to num_redundant_experts + 1 replicas per expert.
    state = {"physical_to_logical_map": phy2log, "logical_to_physical_map": log2phy(phy2log, E, redundant + 1),
             "logical_replica_count": logcnt}
    buf = io.BytesIO()
    torch.save({k: torch.from_numpy(v.copy()) for k, v in state.items()}, buf)
    doc = {k: v.tolist() for k, v in state.items()}
    doc.update(num_redundant_experts=redundant, moe_layers=list(plan.model.moe_layers))
    return {"eplb_state.json": json_bytes(doc), "eplb_state.pt": buf.getvalue()}


def _notes(plan: ir.Plan, platform: Platform) -> list[str]:
    if platform == NPU:
        # vllm-ascend refuses upstream EPLB under its default model runner: no --enable-eplb there
        return ["upstream vLLM has no flag to load an initial expert map and on Ascend runs through vllm-ascend, "
                "which refuses upstream EPLB under its default model runner: launch.sh has no --enable-eplb; "
                "use --format vllm-ascend to load the plan's expert map"]
    return ["upstream vLLM has no flag to load an initial expert map; eplb_state.{json,pt} hold "
            "its EplbState tensors for a loader hook, and --enable-eplb rebalances from measured loads"]


EXPORTER = Exporter(
    name="vllm",
    layer_ids=MOE_LAYERS,
    built=("eplb_state.json", "eplb_state.pt"),
    build=_eplb_state,
    templates={"launch.sh": "launch_vllm.sh.j2"},
    notes=_notes,
    serve_templates={"proxy.sh": "proxy_vllm.sh.j2"},
)
