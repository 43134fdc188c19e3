"""`podplan show`: every format, byte-identical output, and bad input as one line + exit 2 with no file."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from planner.cli.main import main
from planner.ir.plan import SCHEMA_VERSION, Plan, from_json, load_plan, write_plan
from planner.views.common import phase_label
from tests.plan_factory import aggregated_plan, deepseek_v3_plan, tiny_plan
from tests.conftest import assert_one_line_error, run_cli

# A compiled plan (not a synthetic one): real loads, a negative overlap, a frontier the split chose from.
GOLDEN = Path(__file__).resolve().parents[2] / "plans" / "deepseek-v3.cloudmatrix384.json"


@pytest.fixture(scope="module")
def plans(tmp_path_factory) -> dict[str, tuple[Plan, str]]:
    root = tmp_path_factory.mktemp("plans")
    out = {}
    for name, plan in (("tiny", tiny_plan("tiny-deepseek-v3", decode_mode="disaggregated", attention_devices=2)),
                       ("shared", tiny_plan(shared_pd=True, decode_devices=6)),
                       ("dsv3", deepseek_v3_plan())):
        path = root / f"{name}.json"
        write_plan(plan, path)
        out[name] = (plan, str(path))
    return out


def _show(capsys, *args: str) -> tuple[int, str, str]:
    try:
        rc = main(["show", *args])
    except SystemExit as exc:  # argparse errors
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_text_summary(plans, capsys):
    rc, out, err = _show(capsys, plans["dsv3"][1])
    assert rc == 0, err
    for fragment in ("deepseek-v3", "cloudmatrix384", "decode-0", "prefill-5", "predictions", "49.4", "1943",
                     "memory per device", "expert balance", "layers 3-60 x58", "idle 128",
                     "passes: kv-cache -> annotate -> classify -> split -> cut-analysis"):
        assert fragment in out, fragment
    # stage facts measured by cut-analysis: the attention stage feeds the router, 8 expert copies and
    # the shared expert (10 x 7168 x 2 B); 8 expert outputs + the shared output go on (9 x 7168 x 2 B)
    assert re.search(r"layers 3-60 x58 .* 143 KB .* 129 KB .* 71.7 KB .* 64.5 KB", out)


def test_text_summary_of_a_disaggregated_plan(plans, capsys):
    rc, out, _ = _show(capsys, plans["tiny"][1])
    assert rc == 0
    assert "disaggregated" in out and "2:4" in out  # A:F ratio
    assert re.search(r"decode\s+│\s+attention", out) and re.search(r"decode\s+│\s+experts", out)


def test_json_is_the_canonical_plan(plans, capsys, tmp_path):
    plan, path = plans["tiny"]
    rc, out, _ = _show(capsys, path, "--format", "json")
    assert rc == 0 and out == plan.to_json()
    target = tmp_path / "copy.json"
    assert _show(capsys, path, "--format", "json", "-o", str(target))[0] == 0
    assert target.read_text() == Path(path).read_text()
    assert from_json(target.read_text()) == plan


@pytest.mark.parametrize("fmt", ["text", "json", "dot", "html"])
def test_every_format_is_byte_identical_across_runs(plans, capsys, tmp_path, fmt):
    a, b = tmp_path / f"a.{fmt}", tmp_path / f"b.{fmt}"
    for target in (a, b):
        rc, _, err = _show(capsys, plans["shared"][1], "--format", fmt, "-o", str(target))
        assert rc == 0 and f"wrote {target}" in err
    assert a.read_bytes() == b.read_bytes() and a.stat().st_size > 500


def _dot_nodes_and_edges(text: str) -> tuple[set[str], list[tuple[str, str]]]:
    nodes = set(re.findall(r"^\s+(\w+) \[label=", text, re.MULTILINE))
    edges = re.findall(r"^\s+(\w+) -> (\w+)", text, re.MULTILINE)
    return nodes, edges


def test_dot_has_collapsed_stages_cut_sizes_and_devices(plans, capsys):
    rc, out, _ = _show(capsys, plans["dsv3"][1], "--format", "dot")
    assert rc == 0
    assert out.startswith("digraph plan {") and out.rstrip().endswith("}")
    assert out.count("{") == out.count("}")
    assert "layers 0-2 x3" in out and "layers 3-60 x58" in out  # 61 layers drawn as 2 groups
    # cut sizes are the stages' measured inputs: top-8 copies of the 7168-wide BF16 hidden state,
    # 8 int32 expert ids + 8 fp32 weights from the router, 8 expert outputs back to the next layer
    assert re.search(r'g1_attention -> g1_routed_experts \[label="115 KB/token"\]', out)
    assert re.search(r'g1_moe_gate -> g1_routed_experts \[label="64 B/token"\]', out)
    assert re.search(r'g1_routed_experts -> g1_attention \[label="115 KB/token", style=dashed\]', out)
    assert re.search(r'g1_routed_experts -> head \[label="115 KB/token"\]', out)
    assert re.search(r'g0_dense_ffn -> g1_attention \[label="14.3 KB/token"\]', out)
    assert "devices 96-255 (160)" in out and "cluster_decode" in out and "KV cache" in out
    nodes, edges = _dot_nodes_and_edges(out)
    assert edges and all(a in nodes and b in nodes for a, b in edges)


def test_dot_of_a_disaggregated_instance_links_attention_and_experts(plans, capsys):
    _, out, _ = _show(capsys, plans["tiny"][1], "--format", "dot")
    assert re.search(r'i_decode_0_attention -> i_decode_0_experts \[label="dispatch/combine\\nA:F 2:4"', out)


def test_html_is_self_contained_with_grid_and_metrics(plans, capsys):
    plan, path = plans["dsv3"]
    rc, out, _ = _show(capsys, path, "--format", "html")
    assert rc == 0
    assert out.startswith("<!DOCTYPE html>")
    assert "<script" not in out and not re.search(r'(src|href)="(https?:)?//', out) and "@import" not in out
    role_grid = out.split('id="grid-role"')[1].split("</svg>")[0]
    assert role_grid.count('class="cell"') == 384
    assert role_grid.count('data-role="idle"') == 128
    load_grid = out.split('id="grid-load"')[1].split("</svg>")[0]
    assert len(re.findall(r'data-load="\d', load_grid)) == 256  # every expert device has a load
    assert 'id="metric-decode-tpot" data-value="49.4"' in out
    assert 'id="metric-prefill-ttft"' in out and 'class="bar" data-stage="dispatch"' in out
    assert out.count('class="point') == len(plan.frontier) and 'class="point chosen"' in out
    assert 'class="stage-group" data-kind="moe"' in out
    assert 'id="passes">stages built by the passes, in order: kv-cache, annotate, classify' in out


def test_html_splits_devices_serving_both_phases(plans, capsys):
    _, out, _ = _show(capsys, plans["shared"][1], "--format", "html")
    grid = out.split('id="grid-role"')[1].split("</svg>")[0]
    assert grid.count('data-device="0"') == 2  # prefill half and decode half
    assert grid.count('class="cell"') == 6 * 2 + 2


# --- bad input: one line on stderr, exit 2, no output file ------------------------------------------


def _corrupt(tmp_path):
    p = tmp_path / "corrupt.json"
    p.write_text('{"schema_version": 1, "model": ')
    return str(p), "malformed JSON at line 1"


def _future(tmp_path):
    doc = json.loads(tiny_plan().to_json())
    doc["schema_version"] = SCHEMA_VERSION + 1
    p = tmp_path / "future.json"
    p.write_text(json.dumps(doc))
    return str(p), f"plan.schema_version: {SCHEMA_VERSION + 1} is newer than this podplan reads"


def _version_1(tmp_path):
    """A plan from before the pass pipeline built the stages: per-layer formula stages, schema_version 1."""
    doc = json.loads(tiny_plan().to_json())
    doc["schema_version"] = 1
    doc["stages"] = [{"layer": i, "kind": "moe", "roles": ["attention", "moe_gate", "routed_experts"], "params": 1,
                      "flops_per_token": 1.0, "a2e_bytes_per_token": 272.0, "e2a_bytes_per_token": 256.0}
                     for i in range(doc["model"]["num_layers"])]
    del doc["provenance"]["passes"]
    p = tmp_path / "v1.json"
    p.write_text(json.dumps(doc))
    return str(p), "plan.schema_version: 1 is older than this podplan reads (2) (version 1 had one formula-based stage"


def _bad_expert(tmp_path):
    doc = json.loads(tiny_plan().to_json())
    doc["decode"]["experts"][0]["layers"][1]["phy2log"][3] = 300
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(doc))
    return str(p), "plan.decode.experts[0].layers[1].phy2log[3]: expert 300 out of range 0..7"


@pytest.mark.parametrize("make", [
    lambda tmp: (str(tmp / "missing.json"), "no such plan file"),
    _corrupt, _future, _version_1, _bad_expert,
])
def test_bad_plans_fail_in_one_line_without_output(capsys, tmp_path, make):
    path, fragment = make(tmp_path)
    target = tmp_path / "out" / "view.html"
    target.parent.mkdir()  # a missing parent folder is an error of its own (tests/planner/test_output_paths.py)
    rc, out, err = _show(capsys, path, "--format", "html", "-o", str(target))
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("podplan show: error: ") and fragment in lines[0], err
    assert not target.exists()


def test_unknown_format_and_unwritable_output(plans, capsys, tmp_path):
    rc, _, err = _show(capsys, plans["tiny"][1], "--format", "svg", "-o", str(tmp_path / "x.svg"))
    assert rc == 2 and "invalid choice: 'svg'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.svg").exists()
    rc, _, err = _show(capsys, plans["tiny"][1], "--format", "html", "-o", str(tmp_path))
    assert rc == 2 and "is a directory" in err


def test_bad_input_as_a_user_sees_it(tmp_path):
    # one real process: no traceback reaches the terminal, no file is written
    path, _ = _corrupt(tmp_path)
    proc = run_cli("show", path, "--format", "json", "-o", str(tmp_path / "o.json"))
    assert_one_line_error(proc, "corrupt.json: malformed JSON")
    assert not (tmp_path / "o.json").exists()
    path, _ = _version_1(tmp_path)
    assert_one_line_error(run_cli("show", path), "v1.json: plan.schema_version: 1 is older",
                          "recompile it with `podplan compile`")


def test_text_words_what_it_counts(plans, capsys):
    """Batches carry their unit per phase, devices in both phases are not shared-expert devices, solver
    statuses read as words, and a chosen config does not repeat its phase."""
    _, out, _ = _show(capsys, plans["dsv3"][1])
    assert re.search(r"decode-0 .*│\s+\d[\d,.]* seq\s+│", out) and re.search(r"prefill-0 .*│\s+\d[\d,.]* tok\s+│", out)
    assert "shared 0" not in out and "no device serves both phases" in out
    assert "shared experts run on every prefill device and every decode device" in out
    assert not re.search(r"[a-z]x\d", out.split("frontier:")[1].split("passes:")[0])  # no 'feasiblex58'
    assert "prefill prefill" not in out and "decode decode" not in out
    _, out, _ = _show(capsys, plans["shared"][1])
    assert re.search(r"\(\d+ serve both phases\)", out)


def test_text_explains_tpot_against_step_under_mtp(plans, capsys):
    assert plans["dsv3"][0].workload.mtp_accept == 0.7
    _, out, _ = _show(capsys, plans["dsv3"][1])
    assert "decode: TPOT = step 83.98 ms / 1.7 tokens per step (MTP accept 0.7) = 49.4 ms" in out
    _, out, _ = _show(capsys, plans["shared"][1])  # no MTP: step and TPOT agree, nothing to explain
    assert "tokens per step" not in out


def test_html_load_colours_span_the_plans_own_range(capsys):
    """A balanced plan's loads (all within a few per mille of 1) still get distinct colours, and each device
    says its number on hover."""
    _, out, _ = _show(capsys, str(GOLDEN), "--format", "html")
    load_grid = out.split('id="grid-load"')[1].split("</svg>")[0]
    cells = re.findall(r'data-load="([\d.]+)"[^>]*fill="(#[0-9a-f]{6})"[^>]*><title>load ([\d.]+)x mean', load_grid)
    assert len(cells) == len(re.findall(r'data-load="\d', load_grid)) == 376  # every expert device: 200 + 176
    loads = [float(v) for v, _, _ in cells]
    lo, hi = min(loads), max(loads)
    assert hi - lo < 0.05  # the regime where a fixed 0.5x-1.5x scale painted everything white
    fill_of = {float(v): fill for v, fill, _ in cells}
    assert fill_of[lo] != fill_of[hi]
    assert len({fill for _, fill, _ in cells}) >= 4
    assert all(abs(float(v) - float(shown)) < 6e-4 for v, _, shown in cells)


def test_html_tells_instances_apart(capsys):
    _, out, _ = _show(capsys, str(GOLDEN), "--format", "html")
    role_grid = out.split('id="grid-role"')[1].split("</svg>")[0]
    fills: dict[str, set[str]] = {}
    for inst, fill in re.findall(r'data-instance="([\w-]+)"[^>]*fill="(#[0-9a-f]{6})"', role_grid):
        fills.setdefault(inst, set()).add(fill)
    assert all(len(f) == 1 for f in fills.values())
    for phase in ("prefill", "decode"):
        ids = sorted((i for i in fills if i.startswith(phase)), key=lambda i: int(i.rsplit("-", 1)[1]))
        assert len(ids) >= 2
        assert all(fills[a] != fills[b] for a, b in zip(ids, ids[1:])), (phase, fills)  # neighbours differ
    legend = out.split('id="role-legend"')[1].split("</div>")[0]
    assert "decode-0" in legend and "prefill-1" in legend


def test_html_overlap_bars_grow_away_from_their_labels(capsys):
    from planner.ir.plan import load_plan

    plan = load_plan(str(GOLDEN))
    assert min(plan.prefill.predictions.breakdown.values()) < 0  # the prefill step hides time under overlap
    _, out, _ = _show(capsys, str(GOLDEN), "--format", "html")
    for x, w in re.findall(r'class="bar[^"]*" data-stage="[^"]+" x="([\d.-]+)" y="[\d.]+" width="([\d.-]+)"', out):
        assert float(x) >= 120.0 and float(w) >= 0.0
    assert 'class="bar negative" data-stage="overlap"' in out and 'class="overlap"' in out
    breakdown = out.split('id="breakdown"')[1].split("</section>")[0]
    stacked = re.findall(r'<rect x="([\d.-]+)" y="8" width="([\d.-]+)"', breakdown)
    assert stacked and all(float(x) >= 120.0 and float(w) >= 0.0 for x, w in stacked)


def _why(capsys, plan: Plan, tmp_path: Path) -> list[str]:
    path = tmp_path / "why.json"
    write_plan(plan, path)
    _, out, _ = _show(capsys, str(path), "--format", "html")
    return re.findall(r'class="sub why-chosen"[^>]*>([^<]*)<', out)


def _higher_within_slo(plan: Plan, phase: str) -> list:
    """The premise of the note: feasible points within the SLO that plot above the chosen one."""
    key, slo = ("tpot_ms", plan.workload.tpot_slo_ms) if phase == "decode" else ("ttft_ms", plan.workload.ttft_slo_ms)
    chosen = next(p for p in plan.frontier if p.phase == phase and p.chosen)
    return [p for p in plan.frontier if p.phase == phase and not p.chosen and p.feasible
            and getattr(p, key) is not None and (slo is None or getattr(p, key) <= slo)
            and p.throughput_per_device > chosen.throughput_per_device]


def test_html_says_why_the_chosen_point_is_chosen_over_a_higher_neighbour(capsys, tmp_path):
    plan = tiny_plan()  # TPOT 3 ms under a 50 ms SLO: the 1.25x-batch neighbour plots higher and is within it
    higher = _higher_within_slo(plan, "decode")
    assert len(higher) == 1
    why = _why(capsys, plan, tmp_path)
    decode = [w for w in why if "with prefill instances sized" in w]
    assert len(decode) == 1 and "requests/s" in decode[0] and "re-scored" in decode[0]
    assert f"best: {higher[0].config}" in decode[0]
    # a tighter SLO puts the neighbour outside it: nothing to explain
    tight = dataclasses.replace(plan, workload=dataclasses.replace(plan.workload, tpot_slo_ms=3.5))
    assert not _higher_within_slo(tight, "decode")
    assert not [w for w in _why(capsys, tight, tmp_path) if "with prefill instances sized" in w]


def test_html_why_note_follows_its_premise_on_every_golden_plan(capsys):
    for path in sorted(GOLDEN.parent.glob("*.json")):
        plan = load_plan(path)
        _, out, _ = _show(capsys, str(path), "--format", "html")
        for phase in plan.phases:
            frontier = out.split('id="frontier"')[1]
            block = frontier.split(f'aria-label="{phase_label(plan, phase)} Pareto frontier"')
            notes = re.findall(r'class="sub why-chosen"[^>]*>([^<]*)<', block[1].split("</div>")[0]) if len(block) > 1 else []
            assert bool(notes) == bool(_higher_within_slo(plan, phase)), (path.name, phase)


def test_html_why_note_of_an_aggregated_plan_says_decode_only_points_leave_prefill_out(capsys, tmp_path):
    plan = aggregated_plan()
    higher = _higher_within_slo(plan, "decode")
    assert {p.config.split()[0] for p in higher} == {"aggregated", "colocated"}  # one of each mode
    why = _why(capsys, plan, tmp_path)
    assert len(why) == 1 and "requests/s" in why[0] and "re-scored" in why[0]
    assert "Decode-only points (1 of 2)" in why[0] and "leaves out the prefill instances" in why[0]
    assert "An aggregated shape that packs worse" in why[0] and "with prefill instances sized" not in why[0]


def test_views_label_an_aggregated_plan_prefill_plus_decode(capsys, tmp_path):
    """An aggregated plan records one phase, decode, whose instances also run prefill: the views name it
    prefill+decode, show its prompt chunk, and hold its TTFT to the TTFT SLO."""
    plan = aggregated_plan()
    assert plan.aggregated and plan.prefill is None
    plan = dataclasses.replace(plan, workload=dataclasses.replace(plan.workload, ttft_slo_ms=10.0))  # TTFT 15 ms
    path = tmp_path / "agg.json"
    write_plan(plan, path)
    _, out, _ = _show(capsys, str(path))
    assert "devices: prefill+decode 8, idle 0" in out
    assert re.search(r"│ prefill\+decode │ decode-0 │ colocated .*│\s+4 seq \+ 16 tok │", out)
    assert re.search(r"│ prefill\+decode │ yes\s+│\s+3.75 │ 15 \(SLO miss\) │", out)
    assert ("prefill+decode: aggregated serving: every step carries the decode batch (4 seq per device) and a chunk "
            "of 16 prompt tokens per device") in out and "first token in 4 steps (TTFT 15 ms)" in out
    assert "chosen prefill+decode: aggregated 8 dev" in out
    # no row calls it plain decode (the breakdown table writes 'prefill+' over 'decode' in a narrow column)
    assert not re.search(r"^│ decode\s+│\s*\w", out, re.MULTILINE) and "│ prefill+ │" in out
    _, html, _ = _show(capsys, str(path), "--format", "html")
    assert re.findall(r"<h3>([^<&]*)", html) == ["prefill+decode ", "prefill+decode (total 3.75 ms)",
                                                 "prefill+decode: throughput per device vs TPOT (ms)"]
    assert 'id="metric-decode-ttft" data-value="15.0"' in html and 'class="metric miss" id="metric-decode-ttft"' in html
    assert 'class="sub step-note">aggregated serving: every step' in html
    assert "<td>4 + 16 prompt tok</td>" in html and '<td class="l">prefill+decode</td><td class="l">decode-0</td>' in html
    _, dot, _ = _show(capsys, str(path), "--format", "dot")
    assert 'label="prefill+decode: 1 instances, 8 devices"' in dot
    # a plan with both phases keeps their names
    _, out, _ = _show(capsys, str(GOLDEN))
    assert "prefill+decode" not in out and "aggregated serving" not in out


def test_dot_lists_instances_in_order_with_idle_devices_in_a_narrow_column(plans, capsys):
    plan, path = plans["dsv3"]
    _, out, _ = _show(capsys, path, "--format", "dot")
    chain = re.findall(r"^  (\w+) -> (\w+) \[style=invis\];", out, re.MULTILINE)
    column = [chain[0][0]] + [b for _, b in chain]
    assert all(a == b0 for (_, a), (b0, _) in zip(chain, chain[1:]))  # one unbroken top-to-bottom chain
    ids = [inst.id for _, inst in plan.instances()]
    drawn = [re.match(r"i_(\w+?)_(both|attention|experts)$", n).group(1).replace("_", "-") for n in column[1:-1]]
    assert column[0] == "head" and drawn == ids and column[-1] == "idle"
    assert re.search(r'idle \[label="idle\\ndevices 256-383 \(128\)"', out)
    # every label line stays short: the graph is one column that fits a page's width
    labels = re.findall(r'label="([^"]*)"', out)
    assert max(len(line) for text in labels for line in text.split("\\n")) <= 60


def test_serving_modes_section_in_text_and_html(plans, capsys):
    # a compiled plan records the search: the best of each serving mode side by side, and why the winner won
    path = Path(__file__).resolve().parents[2] / "plans" / "mixtral-8x22b.h100-cluster-2.json"
    plan = load_plan(path)
    assert plan.search is not None and plan.search.chosen.mode == "agg"
    _, text, _ = _show(capsys, str(path), "--format", "text")
    assert "serving modes (objective: output tokens/s per device under the SLOs)" in text
    assert re.search(r"agg \(chosen\) .*aggregated \(chunked prefill\)", text)
    assert re.search(r"disagg .*disaggregated prefill/decode", text)
    assert "chosen agg: agg serves " in text
    assert re.search(r"the first choice had TPOT \d+\.\d\d ms > 46 once balanced: searched again at expert imbalance "
                     r"decode 1\.[1-9]", text), text
    _, html, _ = _show(capsys, str(path), "--format", "html")
    assert "<h2>Serving modes</h2>" in html and '<tr class="chosen"><td class="l">agg (chosen)</td>' in html
    assert '<p class="sub search-note">chosen agg: agg serves ' in html
    # a plan without a record (synthetic, or version 2) shows no such section
    _, bare, _ = _show(capsys, plans["tiny"][1], "--format", "text")
    assert plans["tiny"][0].search is None and "serving modes" not in bare
