"""`podplan show --format dot`: the stage graph (identical layers collapsed, measured cut sizes on
edges) and the device assignment (one node per instance role, device ranges in the label; instances in
plan order, idle devices last), as Graphviz DOT."""

from __future__ import annotations

from planner.ir.plan import Plan, device_ranges
from planner.views.common import human_bytes, human_count, instance_hardware, phase_label, stage_groups, stage_label, stage_named
from planner.views.html import ROLE_COLOURS, role_fill


def _q(text: str) -> str:
    """A DOT double-quoted string."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


# Role names as drawn ("both" is attention and experts on the same devices).
_ROLE_LABEL = {"both": "attention + experts", "attention": "attention", "experts": "experts"}


def render_dot(plan: Plan) -> str:
    """Stages on top, then every instance in plan order (prefill-0, prefill-1, ..., decode-0, ...) one per row,
    then the idle devices: a tall, narrow graph that fits a page's width."""
    m, t = plan.model, plan.topology
    lines = [
        "digraph plan {",
        f"  graph [label={_q(f'{m.name} on {t.name} ({t.num_devices} devices)')}, labelloc=t, fontname=Helvetica,"
        + " rankdir=TB, compound=true, newrank=true, nodesep=0.25, ranksep=0.35];",
        '  node [shape=box, style="rounded,filled", fillcolor="#ffffff", fontname=Helvetica, fontsize=11];',
        "  edge [fontname=Helvetica, fontsize=10];",
        "",
        "  subgraph cluster_stages {",
        '    label="stages (per token; identical layers collapsed)";',
    ]
    lines += _stage_lines(plan)
    lines += ["  }", ""]
    column = ["head"]  # first node of each block, top to bottom: invisible edges keep them in this order
    for phase, ph in plan.phases.items():
        lines.append(f"  subgraph cluster_{phase} {{")
        title = f"{phase_label(plan, phase)}: {len(ph.instances)} instances, {len(ph.devices)} devices"
        lines.append(f"    label={_q(title)};")
        for inst in ph.instances:
            node = _node_id(inst.id)
            placement = ph.experts[inst.experts]
            lines.append(f"    subgraph cluster_{node} {{")
            hardware = instance_hardware(plan, inst)
            head = (f"{inst.id}: {inst.mode}, DP{inst.attention_dp} TP{inst.attention_tp} EP{inst.ep}\n"
                    + (f"on {hardware}\n" if hardware else "") +
                    f"{inst.microbatches} microbatch{'es' if inst.microbatches != 1 else ''}, "
                    f"{placement.slots_per_device} expert slots/device")
            lines.append(f"      label={_q(head)};")
            groups: dict[str, list[int]] = {}
            for d in inst.devices:
                groups.setdefault(inst.role_of(d), []).append(d)
            first = True
            for role in ("both", "attention", "experts"):
                if role not in groups:
                    continue
                ds = groups[role]
                label = f"{_ROLE_LABEL[role]}\ndevices {device_ranges(ds)} ({len(ds)})"
                fill = role_fill(plan, phase, role, inst.id)
                lines.append(f"      {node}_{role} [label={_q(label)}, fillcolor=\"{fill}\", fontcolor=\"{_ink(fill)}\"];")
                if first:
                    column.append(f"{node}_{role}")
                    first = False
            if inst.mode == "disaggregated":
                ratio = f"A:F {len(inst.attention_devices)}:{len(inst.expert_devices)}"
                edge = "dispatch/combine\n" + ratio
                lines.append(f"      {node}_attention -> {node}_experts [label={_q(edge)}, dir=both];")
                column[-1] = f"{node}_experts"  # the next block goes below the instance's last row
            lines.append("    }")
        lines.append("  }")
    used = {d for ph in plan.phases.values() for d in ph.devices}
    idle = [d for d in range(t.num_devices) if d not in used]
    if idle:
        label = f"idle\ndevices {device_ranges(idle)} ({len(idle)})"
        lines.append(f"  idle [label={_q(label)}, fillcolor=\"{ROLE_COLOURS[(None, 'idle')]}\", style=\"rounded,filled,dashed\"];")
        column.append("idle")
    for a, b in zip(column, column[1:]):
        lines.append(f"  {a} -> {b} [style=invis];")
    if plan.prefill is not None and plan.decode is not None:
        src, dst = plan.prefill.instances[-1], plan.decode.instances[0]
        lines.append(f"  {_node_id(src.id)}_{_last_role(src)} -> {_node_id(dst.id)}_{_first_role(dst)} "
                     "[label=\"KV cache\", style=dotted, ltail=cluster_prefill, lhead=cluster_decode];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _ink(fill: str) -> str:
    """Black or white text, whichever reads on `fill` (the instance shades run from light to dark)."""
    r, g, b = (int(fill[i:i + 2], 16) for i in (1, 3, 5))
    return "#000000" if 0.299 * r + 0.587 * g + 0.114 * b > 150 else "#ffffff"


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


def _last_role(inst) -> str:
    return "both" if inst.mode == "colocated" else "experts"
