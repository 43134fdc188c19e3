"""`podplan show --format text`: the summary a user reads first, as rich tables."""

from __future__ import annotations

import io

from rich.console import Console
from rich.table import Table

from planner.ir.plan import Plan
from planner.views.common import (
    balance_stats,
    deployment_rows,
    device_counts,
    ffn_label,
    human_bytes,
    human_count,
    num,
    slo_status,
    stage_groups,
    stage_names,
)


def print_summary(plan: Plan, console: Console) -> None:
    """Header, deployment, predictions, step breakdown, memory, expert balance, provenance."""
    m, t, w = plan.model, plan.topology, plan.workload
    ok = "[green]feasible[/]" if plan.feasible else "[red]INFEASIBLE[/]"
    console.print(f"[bold]{m.name}[/] on [bold]{t.name}[/] ({t.num_devices} x {t.hardware}, "
                  f"{t.dies_per_device} die{'s' if t.dies_per_device > 1 else ''} each) - {ok} - schema v{plan.schema_version}")
    console.print(f"model: {m.num_layers} layers ({len(m.moe_layers)} MoE), {m.num_routed_experts} routed experts "
                  f"top-{m.top_k}, {m.num_shared_experts} shared, {human_count(m.params_total)} params "
                  f"({human_count(m.params_active)} active), one expert {human_bytes(m.expert_bytes)}")
    slo = ", ".join(x for x in (f"TPOT <= {num(w.tpot_slo_ms)} ms" if w.tpot_slo_ms else "",
                                f"TTFT <= {num(w.ttft_slo_ms)} ms" if w.ttft_slo_ms else "") if x) or "none"
    console.print(f"workload: input {w.input_len}, output {w.output_len}, prefix hit {w.prefix_hit:.0%}, {w.quant}, "
                  f"MTP accept {w.mtp_accept:g}; SLOs: {slo}")
    console.print("devices: " + ", ".join(f"{k} {v}" for k, v in device_counts(plan).items()))
    console.print(_deployment(plan))
    console.print(_predictions(plan))
    console.print(_breakdown(plan))
    console.print(_memory(plan))
    console.print(_balance(plan))
    console.print(_stages(plan))
    _footer(plan, console)


def text_of(plan: Plan, width: int = 160) -> str:
    """The summary as plain text (no colour), for `-o FILE`."""
    buf = io.StringIO()
    print_summary(plan, Console(file=buf, width=width, color_system=None, highlight=False, force_terminal=False))
    return buf.getvalue()


def _table(title: str, cols: list[str], left: int = 2) -> Table:
    table = Table(title=title, title_justify="left")
    for i, col in enumerate(cols):
        table.add_column(col, justify="left" if i < left else "right")
    return table


def _deployment(plan: Plan) -> Table:
    table = _table("deployment", ["phase", "instance", "mode", "devices", "device ids", "attention DPxTP", "EP",
                                  "A:F", "microbatches", "batch/device", "slots/device"], left=3)
    for r in deployment_rows(plan):
        table.add_row(r["phase"], r["instance"], r["mode"], str(r["devices"]), r["device_ids"], r["dp_tp"],
                      str(r["ep"]), r["af"], str(r["microbatches"]), num(r["batch_per_device"]),
                      str(r["slots_per_device"]))
    return table


def _predictions(plan: Plan) -> Table:
    table = _table("predictions", ["phase", "feasible", "TPOT ms", "TTFT ms", "step ms", "tokens/s/device"])
    slo = slo_status(plan)
    for name, ph in plan.phases.items():
        p = ph.predictions
        feas = "yes" if ph.feasible else f"NO: {p.infeasible_reason or 'memory'}"
        tpot = num(p.tpot_ms) + (" (SLO miss)" if name == "decode" and slo.get("tpot") == "miss" else "")
        ttft = num(p.ttft_ms) + (" (SLO miss)" if name == "prefill" and slo.get("ttft") == "miss" else "")
        table.add_row(name, feas, tpot, ttft, num(p.step_ms), num(p.throughput_per_device))
    return table


def _breakdown(plan: Plan) -> Table:
    names: list[str] = []
    for ph in plan.phases.values():
        names += [s for s in stage_names(ph.predictions.breakdown) if s not in names]
    table = _table("step breakdown (ms)", ["phase", *names, "total"], left=1)
    for name, ph in plan.phases.items():
        b = ph.predictions.breakdown
        table.add_row(name, *(num(b.get(s)) for s in names), num(sum(b.values())))
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
            table.add_row(name, role, num(use.used_gb), num(use.capacity_gb),
                          *(num(use.breakdown.get(k)) for k in kinds), "yes" if use.feasible else "NO")
    return table


def _balance(plan: Plan) -> Table:
    table = _table("expert balance (device load max/mean per layer)",
                   ["phase", "used by", "algorithm", "split", "slots", "slots/device", "redundant", "mean",
                    "worst", "worst layer", "doubled replicas"], left=4)
    for b in balance_stats(plan):
        users = ",".join(b.used_by) if len(b.used_by) <= 2 else f"{b.used_by[0]}..{b.used_by[-1]} ({len(b.used_by)})"
        table.add_row(b.phase, users, b.algorithm, "weighted" if b.weighted else "equal", str(b.slots),
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


def _footer(plan: Plan, console: Console) -> None:
    pr = plan.provenance
    chosen = [p for p in plan.frontier if p.chosen]
    console.print(f"frontier: {len(plan.frontier)} points kept"
                  + (f"; chosen: {'; '.join(f'{p.phase} {p.config}' for p in chosen)}" if chosen else ""))
    statuses: dict[str, int] = {}
    for s in pr.solvers:
        statuses[s.status] = statuses.get(s.status, 0) + 1
    gaps = [s.gap for s in pr.solvers if s.gap is not None]
    solver = ", ".join(f"{k} x{v}" for k, v in sorted(statuses.items())) or "none recorded"
    worst_gap = f", worst gap {max(gaps):.2%}" if gaps else ""
    console.print(f"provenance: podplan {pr.podplan_version}, seed {pr.seed}, solvers: {solver}{worst_gap}")
    console.print("passes: " + (" -> ".join(pr.passes) or "none recorded"))
    console.print(f"model config sha256 {plan.model.config_sha256[:12]}..., topology sha256 "
                  f"{plan.topology.sha256[:12]}..., plan sha256 {plan.digest()[:12]}...")
