"""`podplan show --format dot`: the stage graph (identical layers collapsed, cut sizes on edges) and
the device assignment (one node per instance role, device ranges in the label), as Graphviz DOT."""

from __future__ import annotations

from planner.ir.plan import Plan, device_ranges
from planner.views.common import ffn_label, human_bytes, human_count, stage_groups
from planner.views.html import ROLE_COLOURS


def _q(text: str) -> str:
    """A DOT double-quoted string."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def render_dot(plan: Plan) -> str:
    m, t = plan.model, plan.topology
    lines = [
        "digraph plan {",
        f"  graph [label={_q(f'{m.name} on {t.name} ({t.num_devices} devices)')}, labelloc=t, fontname=Helvetica,"
        + " rankdir=TB, compound=true];",
        '  node [shape=box, style="rounded,filled", fillcolor="#ffffff", fontname=Helvetica, fontsize=11];',
        "  edge [fontname=Helvetica, fontsize=10];",
        "",
        "  subgraph cluster_stages {",
        '    label="stages (per token; identical layers collapsed)";',
        '    embed [label="embedding", fillcolor="#eceff4"];',
    ]
    prev = "embed"
    for i, g in enumerate(stage_groups(plan)):
        st = g.stage
        attn, ffn = f"g{i}_attention", f"g{i}_ffn"
        attn_label = "attention\n" + g.label
        lines.append(f"    {attn} [label={_q(attn_label)}, fillcolor=\"#dbe7f3\"];")
        colour = "#e9dff0" if st.kind == "moe" else "#e3efe0"
        label = f"{ffn_label(st, m.num_routed_experts)}\n{human_count(st.params)} params/layer"
        lines.append(f"    {ffn} [label={_q(label)}, fillcolor=\"{colour}\"];")
        lines.append(f"    {prev} -> {attn};")
        if st.kind == "moe":
            lines.append(f"    {attn} -> {ffn} [label={_q(f'{human_bytes(st.a2e_bytes_per_token)}/token')}];")
            lines.append(f"    {ffn} -> {attn} [label={_q(f'{human_bytes(st.e2a_bytes_per_token)}/token')}, style=dashed];")
        else:
            lines.append(f"    {attn} -> {ffn} [label=\"in-device\"];")
        prev = ffn
    lines += ['    head [label="final norm + LM head", fillcolor="#eceff4"];', f"    {prev} -> head;", "  }", ""]
    for phase, ph in plan.phases.items():
        lines.append(f"  subgraph cluster_{phase} {{")
        lines.append(f"    label={_q(f'{phase}: {len(ph.devices)} devices')};")
        for inst in ph.instances:
            node = _node_id(inst.id)
            placement = ph.experts[inst.experts]
            lines.append(f"    subgraph cluster_{node} {{")
            head = (f"{inst.id}: {inst.mode}, DP{inst.attention_dp} TP{inst.attention_tp} EP{inst.ep}, "
                    f"mb {inst.microbatches}, {placement.slots_per_device} slots/device")
            lines.append(f"      label={_q(head)};")
            groups: dict[str, list[int]] = {}
            for d in inst.devices:
                groups.setdefault(inst.role_of(d), []).append(d)
            for role in ("both", "attention", "experts"):
                if role not in groups:
                    continue
                ds = groups[role]
                label = f"{role}\ndevices {device_ranges(ds)} ({len(ds)})"
                lines.append(f"      {node}_{role} [label={_q(label)}, fillcolor=\"{ROLE_COLOURS[(phase, role)]}\", "
                             "fontcolor=\"#ffffff\"];")
            if inst.mode == "disaggregated":
                ratio = f"A:F {len(inst.attention_devices)}:{len(inst.expert_devices)}"
                edge = "dispatch/combine\n" + ratio
                lines.append(f"      {node}_attention -> {node}_experts [label={_q(edge)}, dir=both];")
            lines.append("    }")
        lines.append("  }")
    if plan.prefill is not None and plan.decode is not None:
        src, dst = plan.prefill.instances[0], plan.decode.instances[0]
        lines.append(f"  {_node_id(src.id)}_{_first_role(src)} -> {_node_id(dst.id)}_{_first_role(dst)} "
                     "[label=\"KV cache\", style=dotted, ltail=cluster_prefill, lhead=cluster_decode];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _node_id(iid: str) -> str:
    return "i_" + "".join(c if c.isalnum() else "_" for c in iid)


def _first_role(inst) -> str:
    return "both" if inst.mode == "colocated" else "attention"
