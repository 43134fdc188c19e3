"""`podplan balance` from the command line: output file, determinism, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from planner.cli.main import main
from tests.conftest import assert_one_line_error, run_cli
from tests.planner.test_eplb import PHY2LOG, WEIGHT


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def weight_file(tmp_path):
    path = tmp_path / "w.json"
    path.write_text(json.dumps(WEIGHT.tolist()))
    return path


def test_eplb_conformance_from_the_command_line(tmp_path, weight_file):
    out = tmp_path / "eplb.json"
    proc = run_cli("balance", str(weight_file), "--devices", "8", "--slots-per-device", "2", "--nodes", "2",
                   "--groups", "4", "--algorithm", "eplb", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert doc["phy2log"] == PHY2LOG
    assert "EPLB max/mean" in proc.stdout and "wrote" in proc.stdout


def test_ilp_output_fields(capsys, tmp_path, weight_file):
    out = tmp_path / "b.json"
    code, stdout, _ = cli(capsys, "balance", str(weight_file), "--devices", "8", "--slots-per-device", "2",
                          "--split", "weighted", "--time-limit", "0.2", "-o", str(out))
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["algorithm"] == "ilp" and doc["split"] == "weighted" and doc["mode"] == "global"
    assert len(doc["phy2log"]) == 2 and len(doc["phy2log"][0]) == 16
    assert len(doc["shares"][0]) == 16 and len(doc["logcnt"][0]) == 12
    layer = doc["per_layer"][0]
    for key in ("device_loads", "max_over_mean", "bound", "gap", "status", "eplb_max_over_mean"):
        assert key in layer
    assert len(layer["device_loads"]) == 8
    assert doc["totals"]["max_over_mean_worst"] <= doc["totals"]["eplb_max_over_mean_worst"] + 1e-9
    assert "timing" not in doc
    assert "max/mean" in stdout


def test_generator_output_is_byte_identical_across_runs(capsys, tmp_path):
    args = ["balance", "zipf:1.2", "--layers", "3", "--experts", "64", "--devices", "32", "--slots-per-device", "3",
            "--seed", "5", "--workers", "1"]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert cli(capsys, *args, "-o", str(a))[0] == 0
    assert cli(capsys, *args, "--workers", "2", "-o", str(b))[0] == 0
    assert a.read_bytes() == b.read_bytes()
    code, _, _ = cli(capsys, *args, "--timing", "-o", str(b))
    assert code == 0 and "wall_s" in json.loads(b.read_text())["timing"]


def test_previous_layout_round_trip(capsys, tmp_path):
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    args = ["balance", "hot:4", "--layers", "2", "--experts", "32", "--devices", "16", "--slots-per-device", "3"]
    assert cli(capsys, *args, "-o", str(first))[0] == 0
    code, stdout, _ = cli(capsys, *args, "--previous", str(first), "-o", str(second))
    assert code == 0 and "moved" in stdout
    doc = json.loads(second.read_text())
    assert doc["totals"]["moved_slots"] == 0
    assert doc["phy2log"] == json.loads(first.read_text())["phy2log"]


def test_loads_file_shape_is_checked_against_layers_and_experts(tmp_path):
    np.save(tmp_path / "l.npy", np.ones((4, 16)))
    out = tmp_path / "o.json"
    proc = run_cli("balance", str(tmp_path / "l.npy"), "--experts", "256", "--devices", "8",
                   "--slots-per-device", "2", "-o", str(out))
    assert_one_line_error(proc, "16 experts per layer but the model has 256")
    assert not out.exists()


@pytest.mark.parametrize(
    "loads, extra, fragment",
    [
        ("bad", ["--devices", "8", "--slots-per-device", "2"], "no such file"),
        ("nan", ["--devices", "8", "--slots-per-device", "2"], "not a finite number"),
        ("neg", ["--devices", "8", "--slots-per-device", "2"], "negative"),
        ("shape", ["--devices", "8", "--slots-per-device", "2"], "expected a [layers, experts] matrix"),
        ("ok", ["--devices", "2", "--slots-per-device", "2"], "cannot hold 12 experts"),
        ("ok", ["--devices", "0", "--slots-per-device", "2"], "devices must be an integer >= 1"),
        ("ok", ["--devices", "8", "--slots-per-device", "2", "--time-limit", "-1"], "time limit must be >= 0"),
        ("ok", ["--devices", "8", "--slots-per-device", "2", "--nodes", "3"], "do not split over 3 nodes"),
        ("gen", ["--devices", "8", "--slots-per-device", "2"], "--layers L --experts E"),
    ],
)
def test_bad_inputs_exit_2_with_one_line_and_no_file(capsys, tmp_path, loads, extra, fragment):
    files = {
        "ok": WEIGHT.tolist(),
        "nan": [[1.0, "NaN"]],
        "neg": [[1.0, -3.0]],
        "shape": [1.0, 2.0, 3.0],
    }
    path = tmp_path / "in.json"
    if loads in files:
        path.write_text(json.dumps(files[loads]).replace('"NaN"', "NaN"))
        spec = str(path)
    else:
        spec = {"bad": str(tmp_path / "missing.json"), "gen": "zipf:1.2"}[loads]
    out = tmp_path / "out.json"
    code, _, err = cli(capsys, "balance", spec, *extra, "-o", str(out))
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], err
    assert not out.exists()


def test_bad_input_as_a_user_sees_it(tmp_path):
    out = tmp_path / "out.json"
    proc = run_cli("balance", "hot:999", "--layers", "2", "--experts", "16", "--devices", "8",
                   "--slots-per-device", "2", "-o", str(out))
    assert_one_line_error(proc, "hot:K needs an integer")
    assert not out.exists()
