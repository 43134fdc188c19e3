"""`podplan show --format html`: one self-contained page (inline SVG + CSS, no script, no network).

Geometry is computed here; `templates/plan.html.j2` only emits markup.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jinja2

from planner.ir.plan import DeviceAssignment, Plan, devices_of
from planner.views.common import (
    balance_stats,
    deployment_rows,
    device_counts,
    ffn_label,
    human_bytes,
    human_count,
    is_aggregated_point,
    num,
    phase_label,
    search_notes,
    serving_mode_rows,
    slo_status,
    stage_groups,
    stage_names,
)
from planner.views.text import aggregated_notes, step_notes

# Fill per (phase, role). Tableau-10 hues: prefill blues, decode green/orange/purple.
ROLE_COLOURS = {
    ("prefill", "both"): "#4e79a7",
    ("prefill", "attention"): "#a0cbe8",
    ("prefill", "experts"): "#2f4b7c",
    ("decode", "both"): "#59a14f",
    ("decode", "attention"): "#f28e2b",
    ("decode", "experts"): "#b07aa1",
    (None, "idle"): "#d9d9d9",
}
NO_LOAD = "#f0f0f0"  # devices without expert slots on the load grid
# Instances of one phase and role alternate between the role's colour, a lighter and a darker shade, so
# neighbours (decode-0, decode-1) never share a fill: (mix towards, amount) per instance index mod 3.
INSTANCE_SHADES = ((None, 0.0), ((255, 255, 255), 0.4), ((0, 0, 0), 0.3))
# The load grid's sequential ramp (ColorBrewer YlOrRd; its lightest end stays clearly apart from the pale grey
# of devices without experts), stretched over the plan's own load range.
LOAD_RAMP = ((255, 237, 160), (254, 178, 76), (240, 59, 32), (128, 0, 38))
STAGE_COLOURS = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f")
GRID_WIDTH = 1110  # px the device grid may span
PLOT_W, PLOT_H = 520, 300


@dataclass(frozen=True)
class Cell:
    """One device (or, when it serves both phases, one half of it) on the grids."""

    x: float
    y: float
    w: float
    h: float
    device: int
    phase: str
    instance: str
    role: str
    fill: str
    load: float | None  # worst-layer device load / mean (None: no expert slots)
    load_fill: str
    title: str


def render_html(plan: Plan) -> str:
    env = jinja2.Environment(loader=jinja2.PackageLoader("planner.views", "templates"), autoescape=True,
                             keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    return env.get_template("plan.html.j2").render(**page(plan))


def page(plan: Plan) -> dict:
    """Everything the template shows."""
    phases = []
    slo = slo_status(plan)
    for name, ph in plan.phases.items():
        p = ph.predictions
        label = phase_label(plan, name)
        runs_prompts = name == "prefill" or plan.aggregated  # the phase whose TTFT the SLO bounds
        phases.append({
            "name": name,  # ids stay by phase name; `label` is what the page says
            "label": label,
            "notes": [n.removeprefix(f"{label}: ") for n in step_notes(plan) + aggregated_notes(plan)]
            if name == "decode" else [],
            "feasible": ph.feasible,
            "reason": p.infeasible_reason,
            "devices": len(ph.devices),
            "metrics": [m for m in (
                ("tpot", "TPOT", p.tpot_ms, "ms", slo.get("tpot", "") if name == "decode" else ""),
                ("ttft", "TTFT", p.ttft_ms, "ms", slo.get("ttft", "") if runs_prompts else ""),
                ("throughput", "throughput / device", p.throughput_per_device, "tok/s", ""),
                ("step", "step", p.step_ms, "ms", ""),
            ) if m[2] is not None],
            "bars": _bars(p.breakdown),
            "memory": [{"role": r, "used": u.used_gb, "capacity": u.capacity_gb, "fits": u.feasible,
                        "pct": min(100.0, 100.0 * u.used_gb / u.capacity_gb),
                        "breakdown": ", ".join(f"{k} {num(v)}" for k, v in sorted(u.breakdown.items()))}
                       for r, u in sorted(ph.memory.items())],
            "frontier": _frontier_plot(plan, name),
        })
    loads = [max(a.loads) for a in devices_of(plan) if a.loads]
    scale = LoadScale(min(loads), max(loads)) if loads else LoadScale(1.0, 1.0)
    cells, servers, gw, gh = _grid(plan, devices_of(plan), scale)
    used_roles = sorted({(c.phase or None, c.role, c.instance) for c in cells},
                        key=lambda k: (list(ROLE_COLOURS).index(k[:2]), _instance_order(plan, k[2])))
    return {
        "plan": plan,
        "title": f"{plan.model.name} on {plan.topology.name}",
        "num": num,
        "human_bytes": human_bytes,
        "human_count": human_count,
        "counts": device_counts(plan),
        "label_of": lambda phase: phase_label(plan, phase),
        "phases": phases,
        "deployment": deployment_rows(plan),
        "balance": balance_stats(plan),
        "serving_modes": serving_mode_rows(plan),
        "search_notes": search_notes(plan),
        "grid": {"cells": cells, "servers": servers, "width": gw, "height": gh},
        "legend": [{"label": f"{inst} {role}" if inst else role, "fill": role_fill(plan, ph, role, inst)}
                   for ph, role, inst in used_roles],
        "load_legend": [{"label": scale.label(r), "fill": scale.fill(r)} for r in scale.stops()],
        "load_range": scale,
        "stages": _stage_graph(plan),
        "solvers": plan.provenance.solvers,
        "passes": plan.provenance.passes,
        "digest": plan.digest(),
    }


# --- device grid ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadScale:
    """Colours for the plan's own range of worst-layer device loads (1.00-1.06 in a balanced plan): a fixed
    0.5x-1.5x scale would paint every device the same white."""

    lo: float
    hi: float

    def stops(self, n: int = 5) -> list[float]:
        if self.hi - self.lo < 1e-9:
            return [self.lo]
        return [self.lo + (self.hi - self.lo) * i / (n - 1) for i in range(n)]

    def label(self, r: float) -> str:
        """Enough decimals that the legend's stops read apart (1.0000, 1.0005, ... for a tight range)."""
        step = (self.hi - self.lo) / 4
        digits = 3 if step <= 0 else max(3, min(6, 1 - math.floor(math.log10(step))))
        return f"{r:.{digits}f}"

    def fill(self, r: float) -> str:
        f = 0.5 if self.hi - self.lo < 1e-9 else max(0.0, min(1.0, (r - self.lo) / (self.hi - self.lo)))
        pos = f * (len(LOAD_RAMP) - 1)
        i = min(int(pos), len(LOAD_RAMP) - 2)
        t = pos - i
        rgb = tuple(round(a + (b - a) * t) for a, b in zip(LOAD_RAMP[i], LOAD_RAMP[i + 1]))
        return "#{:02x}{:02x}{:02x}".format(*rgb)


def _instance_order(plan: Plan, instance: str | None) -> int:
    ids = [inst.id for _, inst in plan.instances()]
    return ids.index(instance) if instance in ids else -1


def role_fill(plan: Plan, phase: str | None, role: str, instance: str | None) -> str:
    """The role grid's fill of a device: its phase and role's colour, shaded by its instance's index in the
    phase so that neighbouring instances differ."""
    base = ROLE_COLOURS[(phase, role)]
    if phase is None or instance is None:
        return base
    index = [inst.id for inst in plan.phases[phase].instances].index(instance)
    towards, amount = INSTANCE_SHADES[index % len(INSTANCE_SHADES)]
    if towards is None:
        return base
    rgb = [int(base[i:i + 2], 16) for i in (1, 3, 5)]
    return "#{:02x}{:02x}{:02x}".format(*(round(c + (t - c) * amount) for c, t in zip(rgb, towards)))


def _grid(plan: Plan, assignments: list[DeviceAssignment],
          scale: LoadScale) -> tuple[list[Cell], list[dict], float, float]:
    """Devices in server blocks, blocks wrapped in rows; devices of both phases drawn as two halves."""
    t = plan.topology
    n = t.num_devices
    size = 14.0 if n > 128 else 24.0 if n > 32 else 44.0
    step = size + 2
    per_row = min(t.devices_per_server, 16)
    rows_per_server = math.ceil(t.devices_per_server / per_row)
    block_w, block_h = per_row * step, rows_per_server * step + 12  # 12 px for the server label
    gap = 10.0
    servers_per_line = max(1, int((GRID_WIDTH + gap) // (block_w + gap)))
    by_device: dict[int, list[DeviceAssignment]] = {}
    for a in assignments:
        by_device.setdefault(a.device, []).append(a)
    cells, servers = [], []
    num_servers = t.servers_per_pod * t.pods
    for s in range(num_servers):
        bx = (s % servers_per_line) * (block_w + gap)
        by = (s // servers_per_line) * (block_h + gap)
        servers.append({"x": bx, "y": by + 9, "label": f"server {s}"})
        for i in range(t.devices_per_server):
            d = s * t.devices_per_server + i
            x = bx + (i % per_row) * step
            y = by + 12 + (i // per_row) * step
            parts = by_device[d]
            h = size / len(parts)
            for k, a in enumerate(parts):
                cells.append(_cell(plan, a, x, y + k * h, size, h, scale))
    lines = math.ceil(num_servers / servers_per_line)
    return cells, servers, servers_per_line * (block_w + gap) - gap, lines * (block_h + gap) - gap


def _cell(plan: Plan, a: DeviceAssignment, x: float, y: float, w: float, h: float, scale: LoadScale) -> Cell:
    load = max(a.loads) if a.loads else None
    dies = plan.topology.dies_per_device
    if a.role == "idle":
        title = f"device {a.device} (server {a.server}): idle"
    else:
        title = (f"device {a.device} (server {a.server}, {dies} die{'s' if dies > 1 else ''}): "
                 f"{phase_label(plan, a.phase or '')} {a.instance} rank {a.rank}, {a.role}")
        if a.slots:
            title += f", slots {a.slots[0]}-{a.slots[-1]}"
        if a.shared_experts:
            title += ", shared experts"
        if load is not None:
            title += f", load max {load:.3f} / mean {a.mean_load:.3f} x average"
    return Cell(x=x, y=y, w=w, h=h, device=a.device, phase=a.phase or "", instance=a.instance or "", role=a.role,
                fill=role_fill(plan, a.phase, a.role, a.instance), load=load,
                load_fill=scale.fill(load) if load is not None else NO_LOAD, title=title)


# --- stage graph ----------------------------------------------------------------------------------


def _stage_graph(plan: Plan) -> dict:
    """Rows of (attention box -> FFN box), identical layers collapsed, between embedding and head."""
    groups = stage_groups(plan)
    row_h, box_w, box_h, left, mid = 74.0, 280.0, 46.0, 20.0, 450.0
    rows = []
    for i, g in enumerate(groups):
        ls = g.layer
        y = 60.0 + i * row_h
        rows.append({
            "y": y, "label": g.label, "kind": ls.kind,
            "attn": {"x": left, "label": "attention", "sub": f"{g.label}"},
            "ffn": {"x": mid, "label": ffn_label(ls, plan.model.num_routed_experts),
                    "sub": f"{human_count(ls.params)} params/layer"},
            "a2e": human_bytes(ls.attention_to_ffn) + "/token",
            "e2a": human_bytes(ls.ffn_to_next) + "/token",
            "flops": f"{human_count(ls.flops_per_token)} FLOP/token",
        })
    height = 60.0 + len(groups) * row_h + 50
    return {"rows": rows, "box_w": box_w, "box_h": box_h, "left": left, "mid": mid, "height": height,
            "width": mid + box_w + 180, "head_y": 60.0 + len(groups) * row_h}


# --- bars and plots -------------------------------------------------------------------------------


def _bars(breakdown: dict[str, float]) -> dict:
    """Per-stage bars and one stacked bar of the step. A negative stage (overlap: time hidden under other
    stages) is drawn as a hatched bar of its size growing right like the others, never leftwards over the
    labels; the stacked bar shows the positive stages with the hidden part hatched at its end."""
    names = stage_names(breakdown)
    positive = sum(v for v in breakdown.values() if v > 0) or 1.0
    total = sum(breakdown.values())
    peak = max((abs(v) for v in breakdown.values()), default=0.0) or 1.0
    width, label_w, row = 420.0, 120.0, 22.0
    bars, x = [], 0.0
    for i, s in enumerate(names):
        v = breakdown[s]
        colour = STAGE_COLOURS[i % len(STAGE_COLOURS)]
        stack_w = width * v / positive if v > 0 else 0.0
        bars.append({"stage": s, "ms": v, "w": width * abs(v) / peak, "y": 40.0 + i * row, "fill": colour,
                     "negative": v < 0, "stack_x": label_w + x, "stack_w": stack_w, "pct": 100.0 * abs(v) / positive})
        x += stack_w
    hidden = -sum(v for v in breakdown.values() if v < 0)
    overlap = {"x": label_w + width * (positive - hidden) / positive, "w": width * hidden / positive,
               "ms": hidden} if hidden > 0 else None
    return {"bars": bars, "label_w": label_w, "width": width, "height": 40.0 + len(names) * row + 8, "total": total,
            "overlap": overlap}


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(math.ceil((hi - start) / step) + 1)]


def _frontier_plot(plan: Plan, phase: str) -> dict | None:
    """Throughput per device against TPOT (decode) or TTFT (prefill), chosen point marked."""
    xkey = "tpot_ms" if phase == "decode" else "ttft_ms"
    pts = [p for p in plan.frontier if p.phase == phase and getattr(p, xkey) is not None]
    if not pts:
        return None
    xs = [getattr(p, xkey) for p in pts]
    ys = [p.throughput_per_device for p in pts]
    xt, yt = _ticks(0.0, max(xs) * 1.05), _ticks(0.0, max(ys) * 1.05)
    ml, mt, pw, ph = 64.0, 16.0, PLOT_W - 84.0, PLOT_H - 56.0

    def sx(v: float) -> float:
        return ml + pw * (v - xt[0]) / (xt[-1] - xt[0])

    def sy(v: float) -> float:
        return mt + ph - ph * (v - yt[0]) / (yt[-1] - yt[0])

    ordered = sorted(zip(xs, ys, pts), key=lambda z: (z[0], z[1]))
    points = [{"x": sx(x), "y": sy(y), "chosen": p.chosen, "feasible": p.feasible,
               "title": f"{p.config}: {num(y)} tok/s/device at {num(x)} ms" + ("" if p.feasible else " (infeasible)")}
              for x, y, p in ordered]
    slo = plan.workload.tpot_slo_ms if phase == "decode" else plan.workload.ttft_slo_ms
    return {
        "why": _why_chosen(plan, phase, pts, xkey, slo),
        "w": PLOT_W, "h": PLOT_H, "ml": ml, "mt": mt, "pw": pw, "ph": ph,
        "xlabel": ("TPOT" if phase == "decode" else "TTFT") + " (ms)", "ylabel": "tokens/s per device",
        "xticks": [{"x": sx(v), "label": num(v, 3)} for v in xt],
        "yticks": [{"y": sy(v), "label": num(v, 3)} for v in yt],
        "points": points,
        "path": " ".join(f"{'M' if i == 0 else 'L'}{q['x']:.1f},{q['y']:.1f}" for i, q in enumerate(points)),
        "slo_x": sx(slo) if slo is not None and slo <= xt[-1] else None,
    }


def _why_chosen(plan: Plan, phase: str, pts: list, xkey: str, slo: float | None) -> str | None:
    """Why the chosen point is chosen when a feasible point within the SLO plots higher: the search ranks by
    requests/s of the whole topology, and the chosen point is plotted re-scored with the balance reached."""
    chosen = next((p for p in pts if p.chosen), None)
    if chosen is None:
        return None
    better = [p for p in pts if not p.chosen and p.feasible and p.throughput_per_device > chosen.throughput_per_device
              and (slo is None or getattr(p, xkey) <= slo)]
    if not better:
        return None
    best = max(better, key=lambda p: p.throughput_per_device)
    head = (f"Why not a higher point: {len(better)} point{'s' if len(better) > 1 else ''} within the SLO plot "
            f"above the chosen one (best: {best.config}, {num(best.throughput_per_device)} tok/s/device). ")
    tail = ("The chosen point is also plotted as re-scored with the expert balance the balancer reached; the others "
            "assume perfect balance.")
    devices = plan.topology.num_devices
    # a decode frontier holds both modes' points: aggregated ones (their instances run prefill too) beside
    # decode-only ones of disaggregated serving (which need prefill instances beside them)
    aggregated = [p for p in better if is_aggregated_point(p)]
    if is_aggregated_point(chosen):
        why = (f"The search does not rank by one phase's throughput per device: it picks the deployment that "
               f"serves the most requests/s on the {devices} devices. ")
        decode_only = len(better) - len(aggregated)
        if decode_only:
            why += (f"Decode-only points ({decode_only} of {len(better)}) are instances of disaggregated serving: "
                    f"their throughput per device leaves out the prefill instances they need beside them, while the "
                    f"chosen aggregated instances run prefill too. ")
        if aggregated:
            why += "An aggregated shape that packs worse into the devices loses. "
        return head + why + tail
    other = "prefill" if phase == "decode" else "decode"
    why = (f"The search does not rank by one phase's throughput per device: it picks the instance shape whose count, "
           f"with {other} instances sized to serve the same request rate, serves the most requests/s on the "
           f"{devices} devices; a shape that packs worse into them loses. ")
    if aggregated:
        why += (f"Aggregated points ({len(aggregated)} of {len(better)}) run prefill too, chunked into their decode "
                f"steps: the other serving mode, whose best served fewer requests/s. ")
    return head + why + tail
