"""Exported scripts say what the engines' own sources expect (issue 20, items 7-10).

Each test pins one engine fact (docs/export.md names the sources and versions read): SGLang's
instance-wide prefill budget, vllm-ascend's eplb_config key, the version range of each script, no
upstream EPLB on Ascend, the quantisation and all-to-all flags derived from the model's facts, the
engine's own visible-devices variable, the AFD fallback's warning, everything a P/D-disaggregated
plan needs to serve (router/proxy/disaggregated server, --host, the KV connector, the Ascend store), and
an aggregated plan's instances serving both phases (the prompt chunk in each step's token budget).
Scripts are run with stub engines that record their arguments, so the checks read what an engine gets.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import planner.export as ex
from planner.ir.plan import load_plan
from tests.conftest import ROOT
from tests.plan_factory import synthetic_plan, tiny_plan

DEEPSEEK = ROOT / "plans" / "deepseek-v3.cloudmatrix384.json"  # Ascend, int8, P/D on separate devices, MTP
MIXTRAL = ROOT / "plans" / "mixtral-8x22b.h100-cluster-2.json"  # H100, fp8, bf16 checkpoint, aggregated
QWEN = ROOT / "plans" / "qwen3-235b-a22b.cloudmatrix384.json"
ENGINES = ("python3", "vllm", "trtllm-llmapi-launch", "trtllm-serve")


@pytest.fixture(scope="module")
def deepseek():
    return load_plan(DEEPSEEK)


@pytest.fixture(scope="module")
def mixtral():
    plan = load_plan(MIXTRAL)
    assert plan.aggregated  # the search serves it aggregated: one phase whose instances also run prefill
    return plan


@pytest.fixture(scope="module")
def mixtral_pd():
    """The golden Mixtral compile with --mode disagg: prefill and decode instances on separate GPUs."""
    from planner.compile import compile_plan
    from planner.golden import GOLDEN

    golden = next(g for g in GOLDEN if g.file == MIXTRAL.name)
    plan = compile_plan(golden.model, golden.topology, dataclasses.replace(golden.options, mode="disagg"))
    assert plan.prefill is not None and not set(plan.prefill.devices) & set(plan.decode.devices)
    return plan


@pytest.fixture(scope="module")
def written(tmp_path_factory, deepseek, mixtral, mixtral_pd):
    """fmt -> plan label -> folder the export was written to."""
    root = tmp_path_factory.mktemp("exports")
    out: dict[str, dict[str, Path]] = {}
    for label, plan in (("deepseek", deepseek), ("mixtral", mixtral), ("mixtral-pd", mixtral_pd)):
        for fmt in ("sglang", "vllm", "vllm-ascend", "trtllm"):
            folder = root / f"{fmt}-{label}"
            ex.write_export(ex.export_plan(plan, fmt), folder)
            out.setdefault(fmt, {})[label] = folder
    return out


@pytest.fixture
def stubs(tmp_path: Path) -> tuple[Path, Path]:
    """A PATH folder whose engine commands record argv and the environment they saw into a JSON log."""
    folder, log = tmp_path / "bin", tmp_path / "argv.json"
    folder.mkdir()
    for name in ENGINES:
        stub = folder / name
        stub.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -c "
                        f"\"import json, os, sys; json.dump({{'argv': sys.argv[1:], 'env': dict(os.environ)}}, "
                        f"open({str(log)!r}, 'w'))\" \"$@\"\n")
        stub.chmod(0o755)
    return folder, log


def _run(script: Path, stubs: tuple[Path, Path], **env: str) -> subprocess.CompletedProcess:
    folder, _ = stubs
    base = {"PATH": f"{folder}:/usr/bin:/bin", "HOME": str(folder), "INSTANCE": "0", "NODE_RANK": "0"}
    return subprocess.run(["bash", str(script)], env={**base, **env}, capture_output=True, text=True, timeout=30)


def _engine_call(script: Path, stubs: tuple[Path, Path], **env: str) -> tuple[list[str], dict]:
    proc = _run(script, stubs, **env)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(stubs[1].read_text())
    return doc["argv"], doc["env"]


def _value(argv: list[str], flag: str) -> str:
    assert argv.count(flag) == 1, (flag, argv)
    return argv[argv.index(flag) + 1]


STORE = {"ASCEND_MF_STORE_URL": "tcp://10.0.0.1:24666"}


def _command(path_or_text: Path | str) -> str:
    """The engine command of a launch script (its comments name flags too)."""
    text = path_or_text.read_text() if isinstance(path_or_text, Path) else path_or_text
    return text.split("\nexec ", 1)[1]


# 7. SGLang divides --chunked-prefill-size by the DP-attention size: write the instance's budget.
def test_sglang_chunked_prefill_size_is_instance_wide(written, deepseek, stubs):
    argv, _ = _engine_call(written["sglang"]["deepseek"] / "prefill" / "launch.sh", stubs, **STORE)
    inst = deepseek.prefill.instances[0]
    dp = int(_value(argv, "--attn-dp-size"))
    chunk = int(_value(argv, "--chunked-prefill-size"))
    assert chunk == round(inst.batch_per_device * len(inst.attention_devices)) == 1310720
    assert chunk // dp == 16384  # what each DP-attention rank gets after SGLang's division: 16384 tokens per die
    # vLLM and TensorRT-LLM schedule per DP rank: the per-rank share
    argv, _ = _engine_call(written["vllm-ascend"]["deepseek"] / "prefill" / "launch.sh", stubs)
    assert _value(argv, "--max-num-batched-tokens") == "16384"
    argv, _ = _engine_call(written["trtllm"]["deepseek"] / "prefill" / "launch.sh", stubs)
    assert _value(argv, "--max_num_tokens") == "16384"


# 8. vllm-ascend >= 0.14.0rc1 reads the map only from additional_config.eplb_config.expert_map_path.
def test_vllm_ascend_expert_map_sits_under_eplb_config(written, stubs):
    for group in ("prefill", "decode"):
        script = written["vllm-ascend"]["deepseek"] / group / "launch.sh"
        argv, _ = _engine_call(script, stubs)
        config = json.loads(_value(argv, "--additional-config"))
        assert set(config) == {"eplb_config"}  # a top-level expert_map_path is silently ignored since 0.14.0rc1
        path = Path(config["eplb_config"]["expert_map_path"])
        assert path == script.parent / "expert_map.json" and path.is_file()
        assert "vllm-ascend plugin 0.14.0rc1 and later" in script.read_text()


def test_each_script_states_its_version_range_and_uses_that_ranges_flags(written, stubs):
    text = (written["vllm"]["mixtral"] / "decode" / "launch.sh").read_text()
    assert "Written for vLLM 0.11 and later" in text and "vLLM >= 0.10" not in text
    argv, _ = _engine_call(written["vllm"]["mixtral"] / "decode" / "launch.sh", stubs)
    eplb = json.loads(_value(argv, "--eplb-config"))  # the 0.11+ spelling, not 0.10's separate flags
    assert eplb["num_redundant_experts"] == 8 and "--num-redundant-experts" not in argv
    for fmt, words in (("sglang", "Written for SGLang 0.5"), ("trtllm", "Written for TensorRT-LLM 1.x")):
        assert words in (written[fmt]["mixtral"] / "decode" / "launch.sh").read_text()
    assert "Written for sglang-router 0.3" in (written["sglang"]["mixtral-pd"] / "router.sh").read_text()


def test_no_upstream_eplb_for_an_ascend_plan(written, deepseek):
    for group in ("prefill", "decode"):
        assert "--enable-eplb" not in _command(written["vllm"]["deepseek"] / group / "launch.sh")
        assert "--enable-eplb" not in _command(written["vllm-ascend"]["deepseek"] / group / "launch.sh")
    assert "--enable-eplb" in _command(written["vllm"]["mixtral"] / "decode" / "launch.sh")  # GPUs: yes
    notes = ex.export_plan(deepseek, "vllm").notes
    assert any("refuses upstream EPLB" in n and "--format vllm-ascend" in n for n in notes)


def test_ascend_int8_is_msmodelslim(written, stubs):
    argv, _ = _engine_call(written["sglang"]["deepseek"] / "decode" / "launch.sh", stubs, **STORE)
    assert _value(argv, "--quantization") == "modelslim"
    argv, _ = _engine_call(written["vllm-ascend"]["deepseek"] / "decode" / "launch.sh", stubs)
    assert _value(argv, "--quantization") == "ascend"


# 9. Each script carries its own engine's variables and devices.
def test_sglang_and_trtllm_scripts_carry_no_vllm_variables(written):
    for fmt in ("sglang", "trtllm"):
        for label in ("deepseek", "mixtral"):
            for script in written[fmt][label].glob("*/launch.sh"):
                text = script.read_text()
                assert "DP_START" not in text and "DP_LOCAL" not in text, script
    assert "DP_START=" in (written["vllm"]["mixtral"] / "decode" / "launch.sh").read_text()


def test_trtllm_of_an_ascend_plan_names_cuda_devices(written, deepseek, stubs):
    script = written["trtllm"]["deepseek"] / "decode" / "launch.sh"
    text = script.read_text()
    assert "ASCEND_RT_VISIBLE_DEVICES" not in text and "trtllm runs on NVIDIA GPUs, not Ascend 910C" in text
    _, env = _engine_call(script, stubs)
    assert "CUDA_VISIBLE_DEVICES" in env and "ASCEND_RT_VISIBLE_DEVICES" not in env
    assert any("NVIDIA GPUs, not Ascend 910C" in n for n in ex.export_plan(deepseek, "trtllm").notes)
    # and the other way round: vllm-ascend of a GPU plan names Ascend devices
    _, env = _engine_call(written["vllm-ascend"]["mixtral"] / "decode" / "launch.sh", stubs)
    assert "ASCEND_RT_VISIBLE_DEVICES" in env and "CUDA_VISIBLE_DEVICES" not in env


def test_all_to_all_backend_follows_the_model_class(written, stubs):
    argv, _ = _engine_call(written["sglang"]["mixtral"] / "decode" / "launch.sh", stubs)
    assert "--moe-a2a-backend" not in argv  # MixtralForCausalLM does not dispatch through DeepEP
    assert "--init-expert-location" not in argv and "--ep-num-redundant-experts" not in argv  # nor hold spare slots
    assert _value(argv, "--quantization") == "fp8"  # bf16 checkpoint, fp8 plan: quantised at load time
    argv, _ = _engine_call(written["sglang"]["deepseek"] / "decode" / "launch.sh", stubs, **STORE)
    assert _value(argv, "--moe-a2a-backend") == "deepep" and _value(argv, "--ep-num-redundant-experts") == "96"
    qwen = ex.export_plan(load_plan(QWEN), "sglang").files["decode/launch.sh"].decode()
    assert "--moe-a2a-backend deepep" in _command(qwen)  # Qwen3MoeForCausalLM does


@pytest.fixture(scope="module")
def gpt_oss():
    return synthetic_plan("gpt-oss-120b", "h100-cluster:2", prefill_devices=8, quant="fp8")


def test_prequantised_checkpoint_gets_no_quantization_flag(gpt_oss):
    """gpt-oss ships MXFP4 experts: the engines read that from config.json and refuse another method."""
    for fmt in ("sglang", "vllm"):
        text = ex.export_plan(gpt_oss, fmt).files["decode/launch.sh"].decode()
        assert "--quantization" not in _command(text), fmt
        assert "the checkpoint ships mxfp4 weights" in text
    command = _command(ex.export_plan(gpt_oss, "sglang").files["decode/launch.sh"].decode())
    assert "--moe-a2a-backend" not in command  # gpt_oss.py has no DeepEP forward
    assert "--init-expert-location" in command  # but sizes redundant slots


def test_afd_plan_exported_as_colocated_says_its_predictions_do_not_hold():
    export = ex.export_plan(tiny_plan(decode_mode="disaggregated"), "sglang")
    assert any("predicted throughput and latency do not hold" in n for n in export.notes)
    assert "NOT THE PLANNED DEPLOYMENT" in export.files["decode/launch.sh"].decode()
    assert "NOT THE PLANNED DEPLOYMENT" not in export.files["prefill/launch.sh"].decode()


# 10. A P/D-disaggregated plan exports everything its engine needs to serve it.
def test_sglang_pd_router_hosts_and_ascend_store(written, deepseek, stubs):
    folder = written["sglang"]["deepseek"]
    for group in ("prefill", "decode"):
        script = folder / group / "launch.sh"
        proc = _run(script, stubs)  # the Ascend transfer backend's store address is required
        assert proc.returncode == 2 and "ASCEND_MF_STORE_URL" in proc.stderr and len(proc.stderr.splitlines()) == 1
        argv, env = _engine_call(script, stubs, HOST="10.1.2.3", **STORE)
        assert env["ASCEND_MF_STORE_URL"] == STORE["ASCEND_MF_STORE_URL"]
        assert _value(argv, "--host") == "10.1.2.3" and _value(argv, "--disaggregation-mode") == group
        assert _value(argv, "--disaggregation-transfer-backend") == "ascend"
    argv, _ = _engine_call(folder / "prefill" / "launch.sh", stubs, **STORE)
    assert _value(argv, "--host") == "0.0.0.0" and _value(argv, "--disaggregation-bootstrap-port") == "8998"
    router = folder / "router.sh"
    assert _run(router, stubs, PREFILL_URLS="http://p0:30000").returncode == 2  # 5 prefill instances planned
    prefill = [f"http://p{i}:30000" for i in range(len(deepseek.prefill.instances))]
    decode = [f"http://d{i}:30000" for i in range(len(deepseek.decode.instances))]
    argv, _ = _engine_call(router, stubs, PREFILL_URLS=" ".join(prefill), DECODE_URLS=" ".join(decode),
                           BOOTSTRAP_PORTS="9001")
    assert argv[:3] == ["-m", "sglang_router.launch_router", "--pd-disaggregation"]
    pairs = [argv[i + 1:i + 3] for i, a in enumerate(argv) if a == "--prefill"]
    assert pairs == [[prefill[0], "9001"]] + [[u, "8998"] for u in prefill[1:]]
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--decode"] == decode
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["serve"] == ["router.sh"]


def test_vllm_pd_kv_connector_and_proxy(written, deepseek, stubs):
    for group in ("prefill", "decode"):
        argv, _ = _engine_call(written["vllm"]["mixtral-pd"] / group / "launch.sh", stubs)
        kv = json.loads(_value(argv, "--kv-transfer-config"))
        assert kv == {"kv_connector": "NixlConnector", "kv_role": "kv_both"}
    for group, role in (("prefill", "kv_producer"), ("decode", "kv_consumer")):
        argv, _ = _engine_call(written["vllm-ascend"]["deepseek"] / group / "launch.sh", stubs, KV_PORT="37000")
        kv = json.loads(_value(argv, "--kv-transfer-config"))
        assert kv["kv_connector"] == "MooncakeConnectorV1" and kv["kv_role"] == role and kv["kv_port"] == "37000"
        assert kv["kv_connector_extra_config"] == {"prefill": {"dp_size": 80, "tp_size": 1},
                                                   "decode": {"dp_size": 176, "tp_size": 1}}
    proxy = written["vllm-ascend"]["deepseek"] / "proxy.sh"
    assert "load_balance_proxy_server_example.py" in proxy.read_text()
    assert _run(proxy, stubs).returncode == 2
    hosts = [f"p{i}" for i in range(len(deepseek.prefill.instances))]
    argv, _ = _engine_call(proxy, stubs, PROXY_SCRIPT="/opt/proxy.py", PREFILL_HOSTS=" ".join(hosts),
                           DECODE_HOSTS="d0 d1", DECODE_PORTS="9000")
    assert argv[0] == "/opt/proxy.py"
    i = argv.index("--prefiller-hosts")
    assert argv[i + 1:i + 6] == hosts and argv[i + 6] == "--prefiller-ports" and argv[i + 7:i + 12] == ["8000"] * 5
    assert argv[argv.index("--decoder-ports") + 1:] == ["9000", "8000"]
    assert "toy_proxy_server.py" in (written["vllm"]["mixtral-pd"] / "proxy.sh").read_text()


def test_trtllm_pd_cache_transceiver_and_disaggregated_server(written, deepseek, stubs, tmp_path):
    folder = written["trtllm"]["deepseek"]
    for group in ("prefill", "decode"):
        options = yaml.safe_load((folder / group / "extra_llm_api_options.yaml").read_text())
        assert options["cache_transceiver_config"] == {"backend": "DEFAULT", "max_tokens_in_buffer": 5120}
        assert options.get("disable_overlap_scheduler", False) == (group == "prefill")
    serve = tmp_path / "serve"
    ex.write_export(ex.export_plan(deepseek, "trtllm"), serve)
    script = serve / "serve_disaggregated.sh"
    assert _run(script, stubs).returncode == 2
    ctx = [f"p{i}:8000" for i in range(5)]
    argv, _ = _engine_call(script, stubs, CONTEXT_URLS=" ".join(ctx), GENERATION_URLS="d0:8000 d1:8000", PORT="9000")
    assert argv == ["disaggregated", "-c", str(serve / "disagg_config.yaml")]
    config = yaml.safe_load((serve / "disagg_config.yaml").read_text())
    assert config == {"hostname": "0.0.0.0", "port": 9000, "backend": "pytorch",
                      "context_servers": {"num_instances": 5, "urls": ctx},
                      "generation_servers": {"num_instances": 2, "urls": ["d0:8000", "d1:8000"]}}
    argv, _ = _engine_call(folder / "decode" / "launch.sh", stubs)
    assert _value(argv, "--host") == "0.0.0.0"  # trtllm-serve's default (localhost) is unreachable


def test_colocated_pd_has_no_serving_files():
    export = ex.export_plan(synthetic_plan("tiny-mixtral", "local:8", shared_pd=True), "sglang")
    assert not [f for f in export.files if "/" not in f and f != "manifest.json"]
    assert "--disaggregation-mode" not in _command(export.files["decode/launch.sh"].decode())


# An aggregated plan has one phase, decode, whose instances also run prefill: no P/D router, proxy or KV
# connector; each engine gets the plan's prompt chunk inside its step budget.
SERVE_FILES = ("router.sh", "proxy.sh", "serve_disaggregated.sh")


def _chunk_per_device(plan) -> float:
    """The prompt tokens per device and step the search recorded for the chosen aggregated point."""
    chosen = next(p for p in plan.frontier if p.phase == "decode" and p.chosen)
    assert chosen.config.startswith("aggregated "), chosen.config
    return float(re.search(r"chunk ([\d.]+) tok/dev", chosen.config).group(1))


def test_aggregated_plan_serves_both_phases_on_its_instances(written, mixtral, stubs):
    inst = mixtral.decode.instances[0]
    dp = inst.attention_dp
    seqs = round(inst.batch_per_device * len(inst.attention_devices))
    chunk = round(_chunk_per_device(mixtral) * len(inst.attention_devices))
    assert (seqs, chunk, dp) == (256, 1024, 16)  # batch 16, chunk 64 per device: the TPOT-meeting plan
    # the chunk is the cost model's: a prompt takes ceil(prompt / chunk per rank) steps to its first token
    p = mixtral.decode.predictions
    assert math.isclose(math.ceil(mixtral.workload.input_len / (chunk / dp)) * p.step_ms, p.ttft_ms, rel_tol=1e-3)
    for fmt in ("sglang", "vllm", "vllm-ascend", "trtllm"):
        folder = written[fmt]["mixtral"]
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["serve"] == [] and not any((folder / f).exists() for f in SERVE_FILES), fmt
        assert [(g["name"], g["serves"]) for g in manifest["groups"]] == [("decode", ["prefill", "decode"])]
        text = (folder / "decode" / "launch.sh").read_text()
        assert "prefill+decode (aggregated)" in text.splitlines()[1] and "no prefill/decode router" in text
    argv, _ = _engine_call(written["sglang"]["mixtral"] / "decode" / "launch.sh", stubs)
    assert _value(argv, "--max-running-requests") == str(seqs)
    assert _value(argv, "--chunked-prefill-size") == str(seqs + chunk) and "--enable-mixed-chunk" in argv
    assert "--disaggregation-mode" not in argv
    for fmt in ("vllm", "vllm-ascend"):
        argv, _ = _engine_call(written[fmt]["mixtral"] / "decode" / "launch.sh", stubs)
        assert _value(argv, "--max-num-seqs") == str(seqs // dp)
        assert _value(argv, "--max-num-batched-tokens") == str((seqs + chunk) // dp)  # 32 decode + 128 prompt
        assert "--kv-transfer-config" not in argv
    argv, _ = _engine_call(written["trtllm"]["mixtral"] / "decode" / "launch.sh", stubs)
    assert _value(argv, "--max_batch_size") == str(seqs // dp)
    assert _value(argv, "--max_num_tokens") == str((seqs + chunk) // dp)
    options = yaml.safe_load((written["trtllm"]["mixtral"] / "decode" / "extra_llm_api_options.yaml").read_text())
    assert options["enable_chunked_prefill"] is True and "cache_transceiver_config" not in options


def test_disaggregated_plans_get_no_aggregated_budget(written, stubs):
    for label in ("deepseek", "mixtral-pd"):
        for group in ("prefill", "decode"):
            sglang = _command(written["sglang"][label] / group / "launch.sh")
            assert "--enable-mixed-chunk" not in sglang and "aggregated" not in sglang
            vllm = _command(written["vllm"][label] / group / "launch.sh")
            assert ("--max-num-batched-tokens" in vllm) == (group == "prefill")
            options = yaml.safe_load((written["trtllm"][label] / group / "extra_llm_api_options.yaml").read_text())
            assert "enable_chunked_prefill" not in options


def test_aggregated_plan_with_mtp_budgets_draft_tokens_and_says_sglang_does_not_mix():
    plan = synthetic_plan("tiny-deepseek-v3", "local:8", prefill_devices=0, mtp_accept=0.5)
    assert plan.aggregated
    inst = plan.decode.instances[0]
    seqs, dp = round(inst.batch_per_device * len(inst.attention_devices)), inst.attention_dp
    wl = plan.workload
    chunk = round(inst.batch_per_device * (1 + wl.mtp_accept) * wl.input_len / wl.output_len * len(inst.devices))
    export = ex.export_plan(plan, "sglang")
    command = _command(export.files["decode/launch.sh"].decode())
    assert f"--chunked-prefill-size {chunk} " in command and "--enable-mixed-chunk" not in command
    assert any("no prompt chunks into decode steps under MTP" in n for n in export.notes)
    command = _command(ex.export_plan(plan, "vllm").files["decode/launch.sh"].decode())
    assert f"--max-num-batched-tokens {seqs // dp * 2 + chunk // dp} " in command  # 1 + 1 draft token each
    assert "--speculative-config" in command


# 11. bench/engine_args.py: every exported command line goes to the engine's parser, or says it cannot.
def test_engine_args_bench_finds_every_command_and_says_when_an_engine_is_missing(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import engine_args
    finally:
        sys.path.remove(str(ROOT / "bench"))
    out = tmp_path / "sglang"
    ex.write_export(ex.export_plan(load_plan(DEEPSEEK), "sglang"), out)
    env = engine_args._stubs(tmp_path / "bin", tmp_path / "argv.json")
    runs = engine_args._argvs(out, env, tmp_path / "argv.json")
    found = [(label, engine_args._engine_of(argv)) for label, argv in runs]
    assert [label for label, _ in found] == ["prefill/launch.sh node 0", "prefill/launch.sh node 4",
                                             "decode/launch.sh node 0", "decode/launch.sh node 10", "router.sh"]
    assert [f[0] for _, f in found] == ["sglang"] * 4 + ["sglang-router"]
    assert all(f[1][:2] == ["--model-path", "deepseek-ai/DeepSeek-V3"] for _, f in found[:4])
    # where an engine is not installed (as in the project's venv) it says so and still exits 0
    missing = [name for name, (dist, _) in engine_args.ENGINES.items() if engine_args._version(dist) is None]
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "engine_args.py"), "--plans",
                           str(ROOT / "plans" / "tiny-deepseek-v3.local-8.json")], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    for name in missing:
        assert f"{name}: not installed in" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].endswith("0 refused")
