"""The HTML view in a real browser: headless Chromium lays the page out, screenshots it, and the
device grid and metrics are checked on the pixels and in the DOM. Needs /usr/bin/chromium (`make browser`)."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from planner.cli.main import main
from planner.ir.plan import devices_of, write_plan
from tests.plan_factory import deepseek_v3_plan
from planner.views.html import role_fill

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
WIDTH, HEIGHT = 1400, 2000
# Test-only probe appended to a copy of the page: the shipped page has no script. It records where the
# browser laid out the grids and metric cards, so pixels can be checked at those places.
PROBE = """<script>
window.addEventListener('load', () => {
  const box = (el) => { const r = el.getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; };
  const out = {grid: box(document.getElementById('grid-role')), load: box(document.getElementById('grid-load')),
               cells: {}, loads: {}, metrics: {}};
  for (const c of document.querySelectorAll('#grid-role rect.cell')) out.cells[c.dataset.device] = box(c);
  for (const c of document.querySelectorAll('#grid-load rect.cell')) out.loads[c.dataset.device] = [box(c), c.getAttribute('fill')];
  for (const m of document.querySelectorAll('.metric')) out.metrics[m.id] = box(m);
  document.body.setAttribute('data-layout', JSON.stringify(out));
});
</script>"""


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: the HTML view's browser test needs Chromium; run `make browser` "
                    "(apt-get install chromium) and re-run the tests")
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
           "--force-device-scale-factor=1", f"--user-data-dir={tmp / 'profile'}", f"--window-size={WIDTH},{HEIGHT}",
           *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def read_png(path: Path) -> tuple[int, int, list[bytearray]]:
    """A minimal PNG reader (8-bit RGB/RGBA, no interlace): width, height and unfiltered rows."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, bytearray()
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and colour in (2, 6) and interlace == 0, (depth, colour, interlace)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw = zlib.decompress(bytes(idat))
    bpp = 3 if colour == 2 else 4
    stride = w * bpp
    rows, prev = [], bytearray(stride)
    for r in range(h):
        f = raw[r * (stride + 1)]
        cur = bytearray(raw[r * (stride + 1) + 1:(r + 1) * (stride + 1)])
        if f == 1:
            for i in range(bpp, stride):
                cur[i] = (cur[i] + cur[i - bpp]) & 255
        elif f == 2:
            cur = bytearray((a + b) & 255 for a, b in zip(cur, prev))
        elif f == 3:
            for i in range(stride):
                left = cur[i - bpp] if i >= bpp else 0
                cur[i] = (cur[i] + ((left + prev[i]) >> 1)) & 255
        elif f == 4:
            for i in range(stride):
                a = cur[i - bpp] if i >= bpp else 0
                b = prev[i]
                c = prev[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                cur[i] = (cur[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(cur)
        prev = cur
    return w, h, [row if bpp == 3 else bytearray(b for i, b in enumerate(row) if i % 4 != 3) for row in rows]


def _pixel(rows: list[bytearray], x: float, y: float) -> str:
    i = int(x) * 3
    return "#{:02x}{:02x}{:02x}".format(*rows[int(y)][i:i + 3])


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    plan = deepseek_v3_plan("disaggregated")  # prefill, decode attention and decode experts: three colours
    write_plan(plan, tmp / "plan.json")
    assert main(["show", str(tmp / "plan.json"), "--format", "html", "-o", str(tmp / "plan.html")]) == 0
    html = (tmp / "plan.html").read_text()
    (tmp / "probe.html").write_text(html.replace("</body>", PROBE + "</body>"))
    _chromium(tmp, f"--screenshot={tmp / 'shot.png'}", (tmp / "plan.html").as_uri())
    dom = _chromium(tmp, "--dump-dom", (tmp / "probe.html").as_uri()).stdout
    return plan, tmp, dom


def test_dom_has_every_device_and_the_metrics(rendered):
    plan, _, dom = rendered
    grid = dom.split('id="grid-role"')[1].split("</svg>")[0]
    assert len(re.findall(r'<rect class="cell"', grid)) == plan.topology.num_devices == 384
    assert len(re.findall(r'data-role="attention"', grid)) == 160 and len(re.findall(r'data-role="experts"', grid)) == 128
    tpot = plan.decode.predictions.tpot_ms
    assert re.search(rf'id="metric-decode-tpot" data-value="{tpot}"', dom)
    assert "49.4" in dom and "tok/s" in dom and 'id="metric-prefill-ttft"' in dom


def test_screenshot_shows_the_grid_in_role_colours(rendered):
    plan, tmp, dom = rendered
    shot = tmp / "shot.png"
    assert shot.stat().st_size > 50_000  # a blank page compresses to a few KB
    w, h, rows = read_png(shot)
    assert (w, h) == (WIDTH, HEIGHT)
    colours = {bytes(rows[y][x * 3:x * 3 + 3]) for y in range(0, h, 7) for x in range(0, w, 7)}
    assert len(colours) > 40, "the screenshot is (nearly) blank"
    layout = json.loads(re.search(r'data-layout="([^"]*)"', dom).group(1).replace("&quot;", '"'))
    _, gy, gw, gh = layout["grid"]
    assert gy + gh < HEIGHT and gw > 800, f"grid not laid out inside the screenshot: {layout['grid']}"
    # the centre of every device cell has its role colour on the screen
    wrong = []
    for a in devices_of(plan):
        x, y, cw, ch = layout["cells"][str(a.device)]
        want = role_fill(plan, a.phase, a.role, a.instance)
        if _pixel(rows, x + cw / 2, y + ch / 2) != want:
            wrong.append((a.device, want, _pixel(rows, x + cw / 2, y + ch / 2)))
    assert not wrong, wrong[:5]
    # and the expert-load grid shows each expert device's load colour
    loaded = [(d, box, fill) for d, (box, fill) in layout["loads"].items() if fill != "#f0f0f0"]
    assert len(loaded) == 96 + 128
    for d, (x, y, cw, ch), fill in loaded:
        assert _pixel(rows, x + cw / 2, y + ch / 2) == fill, d


def test_screenshot_shows_the_metric_cards(rendered):
    _, tmp, dom = rendered
    _, _, rows = read_png(tmp / "shot.png")
    layout = json.loads(re.search(r'data-layout="([^"]*)"', dom).group(1).replace("&quot;", '"'))
    for mid in ("metric-decode-tpot", "metric-decode-throughput", "metric-prefill-ttft"):
        x, y, cw, ch = layout["metrics"][mid]
        assert 0 < y and y + ch < HEIGHT and cw > 50
        ink = sum(1 for yy in range(int(y), int(y + ch)) for xx in range(int(x), int(x + cw))
                  if sum(rows[yy][xx * 3:xx * 3 + 3]) < 250)  # dark text pixels
        assert ink > 100, f"{mid}: no text rendered in its card"


def test_chromium_missing_message_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", tmp_path / "no-chromium")
    with pytest.raises(pytest.fail.Exception, match="run `make browser`"):
        _chromium(tmp_path)


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else b if pb <= pc else c


def test_png_reader_undoes_every_filter(tmp_path):
    # a 3x5 RGB image, row r filtered with filter type r (None, Sub, Up, Average, Paeth)
    pixels = [bytes((37 * r + 11 * i) % 256 for i in range(9)) for r in range(5)]
    raw, prev = b"", bytes(9)
    for f, row in enumerate(pixels):
        out = []
        for i, x in enumerate(row):
            a, b, c = (row[i - 3] if i >= 3 else 0), prev[i], (prev[i - 3] if i >= 3 else 0)
            pred = (0, a, b, (a + b) // 2, _paeth(a, b, c))[f]
            out.append((x - pred) & 255)
        raw += bytes([f, *out])
        prev = row
    png = b"\x89PNG\r\n\x1a\n"
    for kind, body in ((b"IHDR", struct.pack(">IIBBBBB", 3, 5, 8, 2, 0, 0, 0)), (b"IDAT", zlib.compress(raw)),
                       (b"IEND", b"")):
        png += struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    (tmp_path / "t.png").write_bytes(png)
    w, h, rows = read_png(tmp_path / "t.png")
    assert (w, h) == (3, 5)
    assert [bytes(r) for r in rows] == pixels
