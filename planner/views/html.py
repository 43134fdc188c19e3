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
    num,
    slo_status,
    stage_groups,
    stage_names,
)

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
        phases.append({
            "name": name,
            "feasible": ph.feasible,
            "reason": p.infeasible_reason,
            "devices": len(ph.devices),
            "metrics": [m for m in (
                ("tpot", "TPOT", p.tpot_ms, "ms", slo.get("tpot", "") if name == "decode" else ""),
                ("ttft", "TTFT", p.ttft_ms, "ms", slo.get("ttft", "") if name == "prefill" else ""),
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
    cells, servers, gw, gh = _grid(plan, devices_of(plan))
    used_roles = sorted({(c.phase or None, c.role) for c in cells}, key=lambda k: list(ROLE_COLOURS).index(k))
    return {
        "plan": plan,
        "title": f"{plan.model.name} on {plan.topology.name}",
        "num": num,
        "human_bytes": human_bytes,
        "human_count": human_count,
        "counts": device_counts(plan),
        "phases": phases,
        "deployment": deployment_rows(plan),
        "balance": balance_stats(plan),
        "grid": {"cells": cells, "servers": servers, "width": gw, "height": gh},
        "legend": [{"label": f"{ph or ''} {role}".strip(), "fill": ROLE_COLOURS[(ph, role)]} for ph, role in used_roles],
        "load_legend": [{"label": f"{r:g}", "fill": _load_fill(r)} for r in (0.5, 0.75, 1.0, 1.25, 1.5)],
        "stages": _stage_graph(plan),
        "solvers": plan.provenance.solvers,
        "passes": plan.provenance.passes,
        "digest": plan.digest(),
    }


# --- device grid ----------------------------------------------------------------------------------


def _grid(plan: Plan, assignments: list[DeviceAssignment]) -> tuple[list[Cell], list[dict], float, float]:
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
                cells.append(_cell(a, x, y + k * h, size, h, t.dies_per_device))
    lines = math.ceil(num_servers / servers_per_line)
    return cells, servers, servers_per_line * (block_w + gap) - gap, lines * (block_h + gap) - gap


def _cell(a: DeviceAssignment, x: float, y: float, w: float, h: float, dies: int) -> Cell:
    load = max(a.loads) if a.loads else None
    fill = ROLE_COLOURS[(a.phase, a.role)]
    if a.role == "idle":
        title = f"device {a.device} (server {a.server}): idle"
    else:
        title = (f"device {a.device} (server {a.server}, {dies} die{'s' if dies > 1 else ''}): {a.phase} "
                 f"{a.instance} rank {a.rank}, {a.role}")
        if a.slots:
            title += f", slots {a.slots[0]}-{a.slots[-1]}"
        if a.shared_experts:
            title += ", shared experts"
        if load is not None:
            title += f", load max {load:.3f} / mean {a.mean_load:.3f} x average"
    return Cell(x=x, y=y, w=w, h=h, device=a.device, phase=a.phase or "", instance=a.instance or "", role=a.role,
                fill=fill, load=load, load_fill=_load_fill(load) if load is not None else NO_LOAD, title=title)


def _load_fill(r: float) -> str:
    """Diverging scale: 0.5x mean blue, 1.0x white, 1.5x and above red."""
    f = max(-1.0, min(1.0, (r - 1.0) / 0.5))
    base = (178, 24, 43) if f > 0 else (33, 102, 172)
    a = abs(f)
    rgb = tuple(round(255 + (c - 255) * a) for c in base)
    return "#{:02x}{:02x}{:02x}".format(*rgb)


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
    names = stage_names(breakdown)
    total = sum(breakdown.values()) or 1.0
    peak = max(breakdown.values(), default=0.0) or 1.0
    width, label_w, row = 420.0, 120.0, 22.0
    bars, x = [], 0.0
    for i, s in enumerate(names):
        v = breakdown[s]
        colour = STAGE_COLOURS[i % len(STAGE_COLOURS)]
        bars.append({"stage": s, "ms": v, "w": width * v / peak, "y": 40.0 + i * row, "fill": colour,
                     "stack_x": label_w + x, "stack_w": width * v / total, "pct": 100.0 * v / total})
        x += width * v / total
    return {"bars": bars, "label_w": label_w, "width": width, "height": 40.0 + len(names) * row + 8, "total": total}


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
        "w": PLOT_W, "h": PLOT_H, "ml": ml, "mt": mt, "pw": pw, "ph": ph,
        "xlabel": ("TPOT" if phase == "decode" else "TTFT") + " (ms)", "ylabel": "tokens/s per device",
        "xticks": [{"x": sx(v), "label": num(v, 3)} for v in xt],
        "yticks": [{"y": sy(v), "label": num(v, 3)} for v in yt],
        "points": points,
        "path": " ".join(f"{'M' if i == 0 else 'L'}{q['x']:.1f},{q['y']:.1f}" for i, q in enumerate(points)),
        "slo_x": sx(slo) if slo is not None and slo <= xt[-1] else None,
    }
