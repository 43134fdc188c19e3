"""`podplan show --format dot`: the stage graph (identical layers collapsed, measured cut sizes on
edges) and the device assignment (one node per instance role, device ranges in the label), as Graphviz DOT."""

from __future__ import annotations

from planner.ir.plan import Plan, device_ranges
from planner.views.common import human_bytes, human_count, stage_groups, stage_label, stage_named
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
    ]
    lines += _stage_lines(plan)
    lines += ["  }", ""]
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


# Fill per stage kind: attention blue, MoE side purple, dense FFN green, embed/head grey.
_FILL = {"attention": "#dbe7f3", "moe_gate": "#e9dff0", "routed_experts": "#e9dff0", "shared_experts": "#e9dff0",
         "dense_ffn": "#e3efe0", "embed": "#eceff4", "head": "#eceff4"}


def _edge(src: str, dst: str, nbytes: float, dashed: bool = False) -> str:
    style = ", style=dashed" if dashed else ""
    return f"    {src} -> {dst} [label={_q(f'{human_bytes(nbytes)}/token')}{style}];"


def _stage_lines(plan: Plan) -> list[str]:
    """One cluster row per group of identical layers: a node per stage, an edge per producer -> consumer
    pair labelled with its BF16 bytes per token (the stages' measured inputs). A group of several layers
    draws what one layer hands the next as dashed edges back to its own attention."""
    experts = plan.model.num_routed_experts
    lines = [f"    embed [label=\"embedding\", fillcolor=\"{_FILL['embed']}\"];"]
    exits = [("embed", "embed")]  # (node, stage name) whose outputs the next stage may take in

    def into(dst_node: str, dst: str, feeders: list[tuple[str, str]], dashed: bool = False) -> None:
        by_src = {i.src: i for i in stage_named(plan, dst).inputs}
        for node, src in feeders:
            if src in by_src:
                lines.append(_edge(node, dst_node, by_src[src].bytes_per_token, dashed))

    for g_index, g in enumerate(stage_groups(plan)):
        ls = g.layer
        node_of = {st.name: f"g{g_index}_{st.kind}" for st in ls.stages}
        for st in ls.stages:
            label = f"attention\n{g.label}" if st.kind == "attention" else stage_label(st.kind, experts)
            label += f"\n{human_count(st.params)} params/layer"
            lines.append(f"    {node_of[st.name]} [label={_q(label)}, fillcolor=\"{_FILL[st.kind]}\"];")
        into(node_of[ls.attention.name], f"layer{g.first}_attention", exits)
        own = [(node_of[st.name], st.name) for st in ls.stages]
        for st in ls.ffn:
            into(node_of[st.name], st.name, own)
        if g.count > 1:  # layer first -> layer first + 1 inside the group
            into(node_of[ls.attention.name], f"layer{g.first + 1}_attention", own, dashed=True)
        exits = [(node_of[st.name], f"layer{g.last}_{st.kind}") for st in ls.stages]
    lines.append(f"    head [label=\"final norm + LM head\", fillcolor=\"{_FILL['head']}\"];")
    into("head", "head", exits)
    return lines


def _node_id(iid: str) -> str:
    return "i_" + "".join(c if c.isalnum() else "_" for c in iid)


def _first_role(inst) -> str:
    return "both" if inst.mode == "colocated" else "attention"
