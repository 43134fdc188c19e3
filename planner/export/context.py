"""What the templates see for one group: sizes, nodes, flags, and the plan's names (quoted by the templates)."""

from __future__ import annotations

from planner.export.groups import Group
from planner.export.platform import platform_of
from planner.frontend.zoo import BUNDLED
from planner.ir import plan as ir

# Bundled models whose checkpoint needs code from its own repository even where the engine has the
# architecture: Kimi K2's tokenizer (tiktoken-based) ships as repository code. Every other bundled
# model (DeepSeek-V3, Qwen3-MoE, Mixtral, OLMoE, gpt-oss) is in SGLang and vLLM natively, and
# running a checkpoint's code is a choice the user makes (extra flags pass through launch.sh).
REMOTE_CODE_MODELS = frozenset({"kimi-k2"})


def launch_context(plan: ir.Plan, group: Group, fmt: str, plan_file: str) -> dict:
    m, t, wl = plan.model, plan.topology, plan.workload
    first = group.instances[0]
    dies = group.ranks // len(group.devices)
    nodes = [_nodes(plan, tuple(inst.expert_devices), dies) for inst in group.instances]
    instances = [{"id": inst.id, "nodes": servers} for inst, servers in zip(group.instances, nodes)]
    per_node = sorted({server["ranks"] for servers in nodes for server in servers})
    # attention DP over the EP ranks: the plan's attention TP stays, DP fills the rest (colocated:
    # the same devices; disaggregated: the expert devices host the exported group)
    attn_tp = first.attention_tp if group.ranks % first.attention_tp == 0 else 1
    attn_dp = group.ranks // attn_tp
    attention_devices = len(first.attention_devices) if first.mode == "colocated" else len(first.expert_devices)
    seqs = int(round(first.batch_per_device * attention_devices)) if group.phase == "decode" else 0
    tokens_per_rank = int(round(first.batch_per_device / dies)) if group.phase == "prefill" else 0
    repo = BUNDLED.get(m.name, ("",))[0]
    return {
        "engine": fmt, "plan_file": plan_file, "model": m.name,
        "hf_repo": repo if repo and not repo.startswith("(") else m.name,
        "trust_remote_code": m.name in REMOTE_CODE_MODELS,
        "topology": t.name, "hardware": t.hardware, "platform": platform_of(t),
        "group": group.name, "phase": group.phase, "instances": instances, "nnodes": len(nodes[0]),
        "ranks": group.ranks, "rank_unit": "die" if dies > 1 else "device", "uneven_nodes": len(per_node) > 1,
        "slots_per_rank": group.slots_per_rank, "num_physical": group.num_physical,
        "experts": m.num_routed_experts, "redundant": group.num_physical - m.num_routed_experts,
        "attn_tp": attn_tp, "attn_dp": attn_dp, "max_seqs": seqs, "max_seqs_per_dp": max(1, seqs // attn_dp),
        "tokens_per_rank": tokens_per_rank, "context_len": wl.input_len + wl.output_len,
        "mtp": wl.mtp_accept > 0 and group.phase == "decode", "quant": wl.quant,
        "pd": _disaggregated_pd(plan), "moe_layers": list(m.moe_layers),
    }


def _nodes(plan: ir.Plan, devices: tuple[int, ...], dies: int) -> list[dict]:
    """The servers an instance's EP devices sit on, each with the local ids its engine process sees."""
    t = plan.topology
    by_server: dict[int, list[int]] = {}
    for d in sorted(devices):
        by_server.setdefault(t.server_of(d), []).append(d)
    out = []
    for rank, (server, ds) in enumerate(sorted(by_server.items())):
        local = [(d % t.devices_per_server) * dies + k for d in ds for k in range(dies)]
        out.append({"rank": rank, "server": server, "devices": ir.device_ranges(ds),
                    "visible": ",".join(map(str, local)), "ranks": len(local)})
    return out


def _disaggregated_pd(plan: ir.Plan) -> bool:
    """Prefill and decode on separate devices: the engines' P/D disaggregation (KV moves between them)."""
    if plan.prefill is None or plan.decode is None:
        return False
    return not set(plan.prefill.devices) & set(plan.decode.devices)
