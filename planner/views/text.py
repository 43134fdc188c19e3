"""`podplan show --format text`: the summary a user reads first, as rich tables."""

from __future__ import annotations

import io

from rich.console import Console
from rich.table import Table

from planner.ir.plan import Plan
from planner.views.common import (
    balance_stats,
    deployment_rows,
    hardware_label,
    device_counts,
    ffn_label,
    human_bytes,
    human_count,
    num,
    phase_label,
    prompt_chunk_per_device,
    search_notes,
    serving_mode_rows,
    slo_status,
    stage_groups,
    stage_names,
)


def print_summary(plan: Plan, console: Console) -> None:
    """Header, deployment, predictions, step breakdown, memory, expert balance, provenance."""
    m, t, w = plan.model, plan.topology, plan.workload
    ok = "[green]feasible[/]" if plan.feasible else "[red]INFEASIBLE[/]"
    console.print(f"[bold]{m.name}[/] on [bold]{t.name}[/] ({hardware_label(plan)}, "
                  f"{t.dies_per_device} die{'s' if t.dies_per_device > 1 else ''} each) - {ok} - schema v{plan.schema_version}")
    console.print(f"model: {m.num_layers} layers ({len(m.moe_layers)} MoE), {m.num_routed_experts} routed experts "
                  f"top-{m.top_k}, {m.num_shared_experts} shared, {human_count(m.params_total)} params "
                  f"({human_count(m.params_active)} active), one expert {human_bytes(m.expert_bytes)}")
    slo = ", ".join(x for x in (f"TPOT <= {num(w.tpot_slo_ms)} ms" if w.tpot_slo_ms else "",
                                f"TTFT <= {num(w.ttft_slo_ms)} ms" if w.ttft_slo_ms else "") if x) or "none"
    console.print(f"workload: input {w.input_len}, output {w.output_len}, prefix hit {w.prefix_hit:.0%}, {w.quant}, "
                  f"MTP accept {w.mtp_accept:g}; SLOs: {slo}")
    console.print(devices_line(plan))
    console.print(_deployment(plan))
    console.print(_predictions(plan))
    for note in step_notes(plan) + aggregated_notes(plan):
        console.print(note)
    if plan.search is not None:
        console.print(_serving_modes(plan))
        for note in search_notes(plan):
            console.print(note, markup=False)
    console.print(_breakdown(plan))
    console.print(_memory(plan))
    console.print(_balance(plan))
    console.print(_stages(plan))
    _footer(plan, console)


def devices_line(plan: Plan) -> str:
    """'devices: prefill 200, decode 176, idle 8 (no device serves both phases); shared experts on ...':
    devices shared by the phases and devices running the shared experts are different things."""
    counts = device_counts(plan)
    both = counts.pop("in both phases", None)
    line = "devices: " + ", ".join(f"{k} {v}" for k, v in counts.items())
    if both is not None:
        line += f" ({both} serve both phases)" if both else " (no device serves both phases)"
    if plan.model.num_shared_experts:
        per = []
        for name, ph in plan.phases.items():
            n = len({d for i in ph.instances for d in i.shared_expert_devices})
            label = phase_label(plan, name)
            per.append(f"every {label} device" if n == len(ph.devices) else f"{n} of {len(ph.devices)} {label} devices")
        if per:
            line += "; shared experts run on " + " and ".join(per)
    return line


def step_notes(plan: Plan) -> list[str]:
    """Why a decode TPOT is not its step time: with MTP each step emits 1 + accept tokens per sequence."""
    out = []
    p = plan.decode.predictions if plan.decode is not None else None
    a = plan.workload.mtp_accept
    if p is not None and p.tpot_ms is not None and p.step_ms is not None and a > 0:
        out.append(f"{phase_label(plan, 'decode')}: TPOT = step {num(p.step_ms)} ms / {1 + a:g} tokens per step "
                   f"(MTP accept {a:g}) = {num(p.tpot_ms)} ms")
    return out


def aggregated_notes(plan: Plan) -> list[str]:
    """What an aggregated step holds: the decode batch and a chunk of prompt tokens, which sets TTFT."""
    p = plan.decode.predictions if plan.decode is not None else None
    if plan.decode is None or not plan.aggregated or p is None or not p.step_ms:
        return []
    inst = plan.decode.instances[0]
    chunk = p.breakdown.get("prefill_chunk")
    line = (f"{phase_label(plan, 'decode')}: aggregated serving: every step carries the decode batch "
            f"({num(inst.batch_per_device)} seq per device) and a chunk of {num(prompt_chunk_per_device(plan, inst))} "
            "prompt tokens per device")
    line += f" (prefill_chunk {num(chunk)} ms of the {num(p.step_ms)} ms step)" if chunk is not None else ""
    if p.ttft_ms is not None:
        line += (f"; a {plan.workload.input_len}-token prompt reaches its first token in "
                 f"{p.ttft_ms / p.step_ms:.0f} steps (TTFT {num(p.ttft_ms)} ms)")
    return [line]


def batch_label(phase: str, value: float, chunk: float | None = None) -> str:
    """A deployment's batch per device with its unit: decode batches sequences, prefill batches tokens; an
    aggregated instance's steps add a chunk of prompt tokens."""
    text = f"{num(value)} {'seq' if phase == 'decode' else 'tok'}"
    return text if chunk is None else f"{text} + {num(chunk)} tok"


def text_of(plan: Plan, width: int = 160) -> str:
    """The summary as plain text (no colour), for `-o FILE`."""
    buf = io.StringIO()
    print_summary(plan, Console(file=buf, width=width, color_system=None, highlight=False, force_terminal=False))
    return buf.getvalue()


def _table(title: str, cols: list[str], left: int = 2, first_width: int | None = None) -> Table:
    """first_width: keep the first column this wide when the table squeezes its columns (a phase name)."""
    table = Table(title=title, title_justify="left")
    for i, col in enumerate(cols):
        table.add_column(col, justify="left" if i < left else "right", min_width=first_width if i == 0 else None)
    return table


def _deployment(plan: Plan) -> Table:
    mixed = bool(plan.topology.groups)  # a hardware column only where instances differ in hardware
    table = _table("deployment", ["phase", "instance", *(["hardware"] if mixed else []), "mode", "devices",
                                  "device ids", "attention DPxTP", "EP", "A:F", "microbatches",
                                  "batch/device (seq or tok)", "slots/device"], left=4 if mixed else 3)
    for r in deployment_rows(plan):
        table.add_row(r["phase_label"], r["instance"], *([r["hardware"]] if mixed else []), r["mode"],
                      str(r["devices"]), r["device_ids"], r["dp_tp"], str(r["ep"]), r["af"], str(r["microbatches"]),
                      batch_label(r["phase"], r["batch_per_device"], r["chunk_per_device"]), str(r["slots_per_device"]))
    return table


def _predictions(plan: Plan) -> Table:
    table = _table("predictions", ["phase", "feasible", "TPOT ms", "TTFT ms", "step ms", "tokens/s/device"])
    slo = slo_status(plan)
    for name, ph in plan.phases.items():
        p = ph.predictions
        feas = "yes" if ph.feasible else f"NO: {p.infeasible_reason or 'memory'}"
        tpot = num(p.tpot_ms) + (" (SLO miss)" if name == "decode" and slo.get("tpot") == "miss" else "")
        runs_prompts = name == "prefill" or plan.aggregated  # the phase whose TTFT the SLO bounds
        ttft = num(p.ttft_ms) + (" (SLO miss)" if runs_prompts and slo.get("ttft") == "miss" else "")
        table.add_row(phase_label(plan, name), feas, tpot, ttft, num(p.step_ms), num(p.throughput_per_device))
    return table


def _serving_modes(plan: Plan) -> Table:
    """The best of each serving mode the search found (its scores, before balancing), or why it has none."""
    table = _table("serving modes (objective: output tokens/s per device under the SLOs)",
                   ["mode", "serving", "req/s", "out tok/s/dev", "devices", "TPOT ms", "TTFT ms", "configuration"],
                   left=2)
    table.columns[-1].justify = "left"
    table.columns[-1].overflow = "fold"
    for r in serving_mode_rows(plan):
        table.add_row(r["mode"], r["meaning"], r["req_s"], r["tput"], r["devices"], r["tpot"], r["ttft"], r["config"])
    return table


def _breakdown(plan: Plan) -> Table:
    names: list[str] = []
    for ph in plan.phases.values():
        names += [s for s in stage_names(ph.predictions.breakdown) if s not in names]
    # the widest table: 'prefill+decode' goes on two lines so that the stage columns keep their room
    labels = {name: phase_label(plan, name).replace("+", "+\n") for name in plan.phases}
    table = _table("step breakdown (ms)", ["phase", *names, "total"], left=1,
                   first_width=max(len(line) for label in labels.values() for line in label.splitlines()))
    for name, ph in plan.phases.items():
        b = ph.predictions.breakdown
        table.add_row(labels[name], *(num(b.get(s)) for s in names), num(sum(b.values())))
    return table


def _memory(plan: Plan) -> Table:
    kinds: list[str] = []
    for ph in plan.phases.values():
        for use in ph.memory.values():
            kinds += [k for k in sorted(use.breakdown) if k not in kinds]
    table = _table("memory per device (GB, fullest device of each role)",
                   ["phase", "role", "used", "capacity", *kinds, "fits"])
    for name, ph in plan.phases.items():
        for role in sorted(ph.memory):
            use = ph.memory[role]
            table.add_row(phase_label(plan, name), role, num(use.used_gb), num(use.capacity_gb),
                          *(num(use.breakdown.get(k)) for k in kinds), "yes" if use.feasible else "NO")
    return table


def _balance(plan: Plan) -> Table:
    table = _table("expert balance (device load max/mean per layer)",
                   ["phase", "used by", "algorithm", "split", "slots", "slots/device", "redundant", "mean",
                    "worst", "worst layer", "doubled replicas"], left=4)
    for b in balance_stats(plan):
        users = ",".join(b.used_by) if len(b.used_by) <= 2 else f"{b.used_by[0]}..{b.used_by[-1]} ({len(b.used_by)})"
        table.add_row(phase_label(plan, b.phase), users, b.algorithm, "weighted" if b.weighted else "equal", str(b.slots),
                      str(b.slots_per_device), str(b.replicas), num(b.mean_balance), num(b.worst_balance),
                      "-" if b.worst_layer is None else str(b.worst_layer), str(b.doubled))
    return table


def _stages(plan: Plan) -> Table:
    table = _table("stages of the pass pipeline (per token, BF16; identical layers collapsed)",
                   ["layers", "kind", "FFN stages", "params/layer", "FLOP/token", "attention->FFN", "FFN->next",
                    "attention->FFN int8", "FFN->next int8"], left=3)
    experts = plan.model.num_routed_experts
    for g in stage_groups(plan):
        ls = g.layer
        table.add_row(g.label, ls.kind, ffn_label(ls, experts), human_count(ls.params), human_count(ls.flops_per_token),
                      human_bytes(ls.attention_to_ffn), human_bytes(ls.ffn_to_next),
                      human_bytes(ls.attention_to_ffn_int8), human_bytes(ls.ffn_to_next_int8))
    return table


def chosen_config(phase: str, config: str) -> str:
    """'prefill: 40 dev, ...' from a frontier config that may already start with its phase's name."""
    rest = config[len(phase):].lstrip() if config.startswith(phase + " ") else config
    return f"{phase}: {rest}"


def solver_status(status: str) -> str:
    """A recorded solver status for reading: 'feasiblex58' (58 layers solved, all feasible) -> 'feasible on 58
    layers'; 'EXHAUSTIVE' -> 'exhaustive'."""
    parts = []
    for part in status.split(","):
        word, sep, count = part.rpartition("x")
        if sep and word and count.isdigit():
            parts.append(f"{word.lower()} on {count} layer{'s' if count != '1' else ''}")
        else:
            parts.append(part.lower())
    return ", ".join(parts)


def _footer(plan: Plan, console: Console) -> None:
    pr = plan.provenance
    chosen = [p for p in plan.frontier if p.chosen]
    console.print(f"frontier: {len(plan.frontier)} points kept"
                  + (f"; chosen {'; '.join(chosen_config(phase_label(plan, p.phase), p.config) for p in chosen)}"
                     if chosen else ""))
    console.print(f"provenance: podplan {pr.podplan_version}, seed {pr.seed}")
    for s in pr.solvers:
        gap = f", gap {s.gap:.2%}" if s.gap is not None else ""
        console.print(f"  solver {s.name}: {s.solver}, {solver_status(s.status)}{gap}")
    if not pr.solvers:
        console.print("  solvers: none recorded")
    console.print("passes: " + (" -> ".join(pr.passes) or "none recorded"))
    console.print(f"model config sha256 {plan.model.config_sha256[:12]}..., topology sha256 "
                  f"{plan.topology.sha256[:12]}..., plan sha256 {plan.digest()[:12]}...")
