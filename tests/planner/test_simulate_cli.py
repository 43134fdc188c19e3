"""`podplan simulate`, `compile --rate` and `diff --rate` from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from planner.cli.main import main
from tests.conftest import assert_one_line_error, run_cli

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "plans" / "tiny-deepseek-v3.local-8.json")


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_simulate_prints_percentiles_goodput_and_queues(capsys):
    code, out, err = cli(capsys, "simulate", TINY, "--arrivals", "poisson:20000", "--lengths", "fixed:16:8",
                         "--duration", "0.5", "--tpot-ms", "1")
    assert code == 0, err
    assert "design rate" in out and "TTFT ms" in out and "TPOT ms" in out
    assert "goodput:" in out and "against SLO TPOT <= 1 ms" in out and "queues (max)" in out


def test_simulate_json_is_deterministic_for_a_seed(capsys):
    args = ("simulate", TINY, "--arrivals", "gamma:design:2", "--duration", "2", "--seed", "7", "--json")
    a = json.loads(cli(capsys, *args)[1])
    b = json.loads(cli(capsys, *args)[1])
    assert a == b
    assert a["arrivals"] == f"gamma:{a['design_rate']:g}:2" and a["seed"] == 7
    assert a["requests"] > 1000 and a["requests"] == pytest.approx(2 * a["design_rate"], rel=0.1)
    assert set(a["ttft_ms"]) == {"p50", "p90", "p99", "mean"}
    assert a["queues"]["series"]["t"][0] == 0.0


def test_simulate_html_page(capsys, tmp_path):
    page = tmp_path / "sim.html"
    code, _, err = cli(capsys, "simulate", TINY, "--duration", "0.2", "--tpot-ms", "1", "--html", str(page))
    assert code == 0, err
    text = page.read_text()
    assert text.count("<svg") == 3 and "SLO 1 ms" in text and "<script" not in text


def test_simulate_sweep_reports_the_highest_rate(capsys):
    # the tiny plan's decode serves ~225 req/s of 16:64 at a 36 ms step: 50 req/s meets TPOT <= 45 ms, 1000 not
    code, out, err = cli(capsys, "simulate", TINY, "--lengths", "fixed:16:64", "--duration", "10", "--tpot-ms",
                         "45", "--sweep", "50,1000")
    assert code == 0, err
    assert "highest rate meeting the SLO:" in out and "req/s" in out.splitlines()[-1]
    best = float(out.splitlines()[-1].split(":")[1].split("req/s")[0])
    assert 50 < best < 1000


def test_simulate_trace_file(capsys, tmp_path):
    trace = tmp_path / "azure.jsonl"
    trace.write_text("".join(json.dumps({"arrival_s": i / 1000, "input_len": 8 + i % 9, "output_len": 1 + i % 5})
                             + "\n" for i in range(500)))
    code, out, err = cli(capsys, "simulate", TINY, "--arrivals", str(trace), "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["requests"] == 500 and doc["unfinished"] == 0 and doc["lengths"] == "the arrivals trace's"
    assert doc["arrivals"] == str(trace) and doc["offered_rate"] == pytest.approx(1000.0, rel=0.01)


@pytest.mark.parametrize("args, fragment", [
    (["--arrivals", "poisson:0"], "rate '0' must be a finite number > 0"),
    (["--arrivals", "gamma:5"], "gamma takes a rate and a CV"),
    (["--arrivals", "nothere.jsonl"], "no such trace file"),
    (["--lengths", "fixed:0:4"], "IN '0' must be a whole number >= 1"),
    (["--lengths", "fixed:4"], "fixed takes IN and OUT"),
    (["--duration", "0"], "--duration must be in (0, 86400]"),
    (["--duration", "nan"], "--duration must be a finite number"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--tpot-ms", "-5"], "--tpot-ms must be > 0"),
    (["--sweep", "10,x"], "'x' is not a rate"),
])
def test_bad_flags_are_one_line_exit_2(capsys, args, fragment):
    code, out, err = cli(capsys, "simulate", TINY, *args)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and fragment in err, err


def test_bad_plan_and_bad_trace_line_in_a_subprocess(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"arrival_s": 0, "input_len": 4, "output_len": 2}\nnot json\n')
    assert_one_line_error(run_cli("simulate", TINY, "--arrivals", str(trace)), "t.jsonl:2: not JSON")
    assert_one_line_error(run_cli("simulate", str(tmp_path / "none.json")), "no such plan file")


def _smaller_batch(tmp_path: Path, batch: float) -> str:
    doc = json.loads(Path(TINY).read_text())
    for inst in doc["decode"]["instances"]:
        inst["batch_per_device"] = batch
    path = tmp_path / "small-batch.json"
    path.write_text(json.dumps(doc))
    return str(path)


def test_diff_rate_reports_goodput_and_gates_on_a_drop(capsys, tmp_path):
    # one sequence per attention device: the decode serves ~460 req/s of 16:8, below 600 (the plan serves 898)
    worse = _smaller_batch(tmp_path, 1.0)
    code, out, err = cli(capsys, "diff", TINY, worse, "--rate", "600", "--fail-on", "none")
    assert code == 1, err
    assert "goodput at 600 req/s" in out and "goodput:-1%: goodput at 600 req/s down" in out
    code, out, _ = cli(capsys, "diff", TINY, TINY, "--rate", "600", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["goodput"]["delta_pct"] == 0 and doc["goodput"]["old"]["goodput"] > 0


def test_diff_rate_bad_value(capsys):
    code, _, err = cli(capsys, "diff", TINY, TINY, "--rate", "-3")
    assert code == 2 and "--rate must be a finite number of requests/s > 0" in err


def test_compile_rate_records_the_simulation(tmp_path):
    out = tmp_path / "p.json"
    proc = run_cli("compile", "tiny-deepseek-v3", "--topology", "local:8", "--input-len", "16", "--output-len", "8",
                   "--mode", "disagg", "--rate", "500", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(out.read_text())
    assert plan["provenance"]["options"]["rate"] == 500 and plan["prefill"] is not None
    run = plan["provenance"]["solvers"][-1]
    assert run["solver"] == "simulate" and run["name"].endswith("at 500 req/s") and run["objective"] > 0


def test_compile_rate_refuses_an_aggregated_choice(tmp_path):
    """At 16:8 on local:8 the search picks aggregated serving; --rate chooses among disaggregated ones."""
    out = tmp_path / "p.json"
    proc = run_cli("compile", "tiny-deepseek-v3", "--topology", "local:8", "--input-len", "16", "--output-len", "8",
                   "--rate", "500", "-o", str(out))
    assert_one_line_error(proc, "the search chose aggregated serving, and --rate chooses among disaggregated "
                                "deployments; add --mode disagg")
    assert not out.exists()


def test_compile_rate_bad_value():
    assert_one_line_error(run_cli("compile", "tiny-deepseek-v3", "--topology", "local:8", "--rate", "0", "-o",
                                  "/tmp/never-written.json"), "--rate must be > 0")


def test_an_aggregated_plan_simulates_and_diffs(capsys, tmp_path):
    """A one-phase (aggregated) plan: its decode instances run the prompts in chunks."""
    agg = tmp_path / "agg.json"
    proc = run_cli("compile", "tiny-deepseek-v3", "--topology", "local:8", "--mode", "agg", "-o", str(agg))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(agg.read_text())["prefill"] is None
    code, out, err = cli(capsys, "simulate", str(agg), "--duration", "20")
    assert code == 0, err
    assert "aggregated instances (prefill chunked into the decode steps)" in out and "0 unfinished" in out
    code, out, err = cli(capsys, "diff", TINY, str(agg), "--rate", "5", "--json")
    assert code in (0, 1), err
    doc = json.loads(out)
    assert doc["goodput"]["new"]["goodput"] > 0 and doc["goodput"]["old"]["goodput"] > 0
