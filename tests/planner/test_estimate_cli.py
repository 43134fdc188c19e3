"""`podplan estimate` from the command line: the two reference points, JSON, and bad input."""

from __future__ import annotations

import json

import pytest

from planner.cli.main import main
from tests.conftest import assert_one_line_error, run_cli
from tests.costmodels.shapes import DSV3

DECODE = ["estimate", "deepseek-v3", "--topology", "cloudmatrix384", "--phase", "decode", "--devices", "160",
          "--ep", "320", "--batch-per-device", "96", "--kv-len", "4096", "--mtp-accept", "0.7", "--quant", "int8",
          "--microbatches", "2"]
PREFILL = ["estimate", "deepseek-v3", "--topology", "cloudmatrix384", "--phase", "prefill", "--devices", "16",
           "--ep", "32", "--prompt-len", "4096", "--tokens-per-device", "16384", "--quant", "int8",
           "--microbatches", "2"]


@pytest.fixture(scope="module", autouse=True)
def cached_shapes():
    """Build each model's shape once for the in-process calls (the frontend takes ~1-3 s a model)."""
    import functools

    import planner.frontend.trace as frontend

    original = frontend.model_shape
    frontend.model_shape = functools.lru_cache(maxsize=None)(original)
    yield
    frontend.model_shape = original


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_decode_reference_point_as_a_user_runs_it():
    proc = run_cli(*DECODE)
    assert proc.returncode == 0, proc.stderr
    assert "1,943 output tokens/s" in proc.stdout
    for stage in ("attention", "dispatch", "experts", "combine", "shared_experts", "comm_latency", "launch_overhead",
                  "token_overhead", "overlap"):
        assert stage in proc.stdout
    assert "49.40 ms" in proc.stdout


def test_prefill_reference_point(capsys):
    code, out, _ = cli(capsys, *PREFILL)
    assert code == 0
    assert "6,688 prompt tokens/s" in out and "TTFT" in out and "kv_transfer" in out


def test_json_fields(capsys):
    code, out, _ = cli(capsys, *DECODE, "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["tpot_ms"] == pytest.approx(49.4, rel=0.05)
    assert doc["throughput_per_device"] == pytest.approx(1943, rel=0.05)
    assert doc["feasible"] is True and 0 < doc["memory_per_device_gb"] < 128
    assert sum(doc["breakdown"].values()) == pytest.approx(doc["step_ms"], abs=0.01)
    assert doc["model"] == "deepseek-v3" and doc["topology"] == "cloudmatrix384" and len(doc["topology_sha256"]) == 64
    code, out, _ = cli(capsys, *PREFILL, "--json")
    pre = json.loads(out)
    assert pre["ttft_ms"] > 0 and pre["tpot_ms"] is None
    assert pre["throughput_per_device"] == pytest.approx(6688, rel=0.05)


def test_defaults_disaggregated_and_gpus(capsys):
    code, out, _ = cli(capsys, "estimate", "tiny-deepseek-v3", "--topology", "h800-cluster:2", "--phase", "decode",
                       "--json")
    doc = json.loads(out)
    assert code == 0 and doc["details"]["devices"] == 16 and doc["details"]["ep"] == 16
    assert doc["details"]["quant"] == "fp8" and doc["details"]["tokens_per_step"] == 1.0  # Hopper's default
    code, out, _ = cli(capsys, "estimate", "deepseek-v3", "--topology", "cloudmatrix384", "--phase", "decode",
                       "--mode", "disaggregated", "--attention-devices", "240", "--moe-devices", "144", "--dp-domains", "3",
                       "--batch-per-device", "192", "--quant", "int8", "--microbatches", "2")
    assert code == 0 and "A:F 1.67" in out and "pipeline_wait" in out
    code, out, _ = cli(capsys, "estimate", "deepseek-v3", "--topology", "cloudmatrix384", "--phase", "decode",
                       "--devices", "8", "--batch-per-device", "512")
    assert code == 0 and "infeasible:" in out and "over by" in out


def test_frontend_shape_matches_the_hand_built_one():
    import planner.frontend.trace as frontend

    assert frontend.model_shape("deepseek-v3") == DSV3


@pytest.mark.parametrize("args, fragments", [
    (["--topology", "foo", "--phase", "decode"], ["unknown topology 'foo'", "cloudmatrix384:K", "h800-cluster:N"]),
    (["--topology", "cloudmatrix384", "--phase", "decode", "--quant", "fp8"], ["fp8", "XDS §4.7", "int8"]),
    (["--topology", "cloudmatrix384", "--phase", "decode", "--devices", "160", "--ep", "300"], ["--ep 300", "divisor"]),
    (["--topology", "cloudmatrix384", "--phase", "decode", "--prompt-len", "10"], ["--prompt-len", "prefill only"]),
    (["--topology", "cloudmatrix384", "--phase", "prefill", "--mtp-accept", "0.5"], ["--mtp-accept", "decode only"]),
    (["--topology", "cloudmatrix384", "--phase", "decode", "--mode", "disaggregated"], ["--attention-devices"]),
    # 'afd', the old name of the mode, is still read
    (["--topology", "cloudmatrix384", "--phase", "decode", "--mode", "afd"], ["--mode disaggregated needs"]),
    (["--topology", "cloudmatrix384", "--phase", "decode", "--attention-devices", "4"], ["--mode disaggregated"]),
    (["--topology", "cloudmatrix384", "--phase", "decode", "--imbalance", "0.5"], ["--imbalance 0.5", ">= 1.0"]),
    (["--topology", "cloudmatrix384", "--phase", "decode", "--devices", "0"], ["--devices 0"]),
    (["--topology", "h800-cluster:0", "--phase", "decode"], ["node count must be 1..1024"]),
    (["--topology", "cloudmatrix384", "--phase", "sideways"], ["--phase", "invalid choice"]),
])
def test_bad_input_is_one_line_exit_2(capsys, args, fragments):
    code, _, err = cli_err(capsys, "estimate", "tiny-deepseek-v3", *args)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])


def cli_err(capsys, *args: str) -> tuple[int, str, str]:
    """Like cli(), but argparse errors exit through SystemExit: turn that into a return code."""
    try:
        code = main(list(args))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_unknown_model_as_a_user_runs_it():
    proc = run_cli("estimate", "no-such-model", "--topology", "cloudmatrix384", "--phase", "decode")
    assert_one_line_error(proc, "no-such-model")


def test_small_decode_batch_says_how_many_experts_it_reads(capsys):
    """2 sequences per GPU on EP16: a die's 16 routed pairs touch ~10.6 of its 17 experts, read at the
    bundled H200 profile's FP8 grouped rate; the text says so and --json carries both figures."""
    args = ["estimate", "deepseek-v3", "--topology", "h200-cluster:2", "--phase", "decode", "--devices", "16",
            "--ep", "16", "--batch-per-device", "2", "--kv-len", "8192"]
    code, out, _ = cli(capsys, *args)
    assert code == 0
    from costmodels import profiles
    from costmodels.hardware import H200

    rate = profiles.profile_for(H200).grouped_stream_tbps("fp8")
    assert (f"experts: 10.6 of 17 resident per die touched per layer (balanced routing), weights read at {rate:.2f} "
            "TB/s") in out
    code, out, _ = cli(capsys, *args, "--json")
    d = json.loads(out)["details"]
    assert d["experts_touched_per_die"] == pytest.approx(17 * (1 - (1 - 1 / 17) ** 16), abs=1e-3)  # JSON rounds
    assert 2.0 < d["expert_stream_tbps"] < 3.0  # the profile's grouped rate, not the 4.3 TB/s copy
