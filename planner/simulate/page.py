"""`podplan simulate --html FILE`: one self-contained page (inline SVG, no script) with the latency
distributions (CDFs of TTFT and TPOT against their SLOs) and the queues over time."""

from __future__ import annotations

import html
import math

import numpy as np

from planner.simulate.report import latencies

W, H, PAD = 520, 260, 48
SERIES = (("prefill_queue", "waiting for prefill", "#4e79a7"), ("decode_queue", "waiting for decode", "#f28e2b"),
          ("decode_active", "decoding", "#59a14f"))


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if raw <= m * step)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def _axes(x0: float, x1: float, y0: float, y1: float, xlabel: str, ylabel: str) -> list[str]:
    out = [f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - 10}" y2="{H - PAD}" stroke="#333"/>',
           f'<line x1="{PAD}" y1="10" x2="{PAD}" y2="{H - PAD}" stroke="#333"/>',
           f'<text x="{(W + PAD) / 2}" y="{H - 10}" text-anchor="middle">{html.escape(xlabel)}</text>',
           f'<text x="12" y="{(H - PAD) / 2}" transform="rotate(-90 12 {(H - PAD) / 2})" '
           f'text-anchor="middle">{html.escape(ylabel)}</text>']
    for v in _ticks(x0, x1):
        x = _sx(v, x0, x1)
        out.append(f'<text x="{x:.1f}" y="{H - PAD + 16}" text-anchor="middle">{v:g}</text>')
    for v in _ticks(y0, y1, 4):
        y = _sy(v, y0, y1)
        out.append(f'<text x="{PAD - 4}" y="{y + 4:.1f}" text-anchor="end">{v:g}</text>')
    return out


def _sx(v: float, lo: float, hi: float) -> float:
    return PAD + (v - lo) / ((hi - lo) or 1.0) * (W - 10 - PAD)


def _sy(v: float, lo: float, hi: float) -> float:
    return H - PAD - (v - lo) / ((hi - lo) or 1.0) * (H - PAD - 10)


def _cdf(values: np.ndarray, slo: float | None, label: str) -> str:
    finite = np.sort(values[np.isfinite(values)])
    if finite.size == 0:
        return f"<p>{html.escape(label)}: no request got there before the horizon.</p>"
    idx = np.unique(np.linspace(0, finite.size - 1, min(400, finite.size)).astype(int))
    xs, ys = finite[idx], (idx + 1) / values.size
    hi = max(float(xs[-1]), slo or 0.0) * 1.05 or 1.0
    pts = " ".join(f"{_sx(float(x), 0, hi):.1f},{_sy(float(y), 0, 1):.1f}" for x, y in zip(xs, ys))
    parts = _axes(0, hi, 0, 1, f"{label} (ms)", "share of requests")
    parts.append(f'<polyline fill="none" stroke="#4e79a7" stroke-width="2" points="{pts}"/>')
    if slo:
        x = _sx(slo, 0, hi)
        parts.append(f'<line x1="{x:.1f}" y1="10" x2="{x:.1f}" y2="{H - PAD}" stroke="#e15759" stroke-dasharray="4 3"/>')
        parts.append(f'<text x="{x - 4:.1f}" y="22" text-anchor="end" fill="#e15759">SLO {slo:g} ms</text>')
    return f'<svg width="{W}" height="{H}" role="img"><title>{html.escape(label)} CDF</title>{"".join(parts)}</svg>'


def _queues(series: dict[str, list[float]]) -> str:
    t = series["t"]
    if not t:
        return "<p>no samples</p>"
    hi_t = max(t[-1], 1e-9)
    hi_y = max([max(series[k], default=0) for k, _, _ in SERIES] + [1])
    parts = _axes(0, hi_t, 0, hi_y, "time (s)", "requests")
    legend = []
    for i, (key, label, colour) in enumerate(SERIES):
        pts = " ".join(f"{_sx(x, 0, hi_t):.1f},{_sy(y, 0, hi_y):.1f}" for x, y in zip(t, series[key]))
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{pts}"/>')
        legend.append(f'<span style="color:{colour}">&#9632;</span> {label}')
    return (f'<svg width="{W}" height="{H}" role="img"><title>queues over time</title>{"".join(parts)}</svg>'
            f'<p>{" &nbsp; ".join(legend)}</p>')


def _slo_text(slo: dict) -> str:
    parts = [f"{name} <= {slo[key]:g} ms" for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT")) if slo[key]]
    return " and ".join(parts) or "none (every finished request counts)"


def render_page(title: str, report: dict) -> str:
    """The page for one run (`report` from planner.simulate.report.simulate, with its outcome)."""
    ttft, tpot = latencies(report["outcome"])
    slo = report["slo"]

    def row(name: str, p: dict) -> str:
        cells = "".join(f"<td>{'unfinished' if p[k] is None else f'{p[k]:,.1f}'}</td>" for k in ("p50", "p90", "p99"))
        return f"<tr><th>{name}</th>{cells}</tr>"

    g, th = report["goodput"], report["throughput"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font:14px sans-serif;margin:24px;color:#222}} svg{{font:11px sans-serif;margin-right:16px}}
table{{border-collapse:collapse}} td,th{{padding:2px 10px;text-align:right}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{report["requests"]:,} requests at {report["offered_rate"]:g} req/s offered; {report["unfinished"]:,} unfinished.
Throughput {th["requests_per_s"]:g} req/s; goodput {g["requests_per_s"]:g} req/s
({g["requests_per_s_per_device"]:.4g} per device) against the SLO {html.escape(_slo_text(slo))}.</p>
<table><tr><th></th><th>p50</th><th>p90</th><th>p99</th></tr>{row("TTFT ms", report["ttft_ms"])}{row("TPOT ms", report["tpot_ms"])}</table>
<h2>Latency distribution</h2>
{_cdf(ttft, slo["ttft_ms"], "TTFT")}{_cdf(tpot, slo["tpot_ms"], "TPOT")}
<h2>Queues over time</h2>
{_queues(report["queues"]["series"])}
</body></html>
"""
