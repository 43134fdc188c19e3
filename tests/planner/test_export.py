"""podplan export: every engine format of the golden DeepSeek-V3 plan checked against its format."""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from costmodels.errors import InputError
import planner.export as ex
from planner.ir.plan import devices_of, load_plan
from tests.plan_factory import tiny_plan
from tests.conftest import ROOT, assert_one_line_error, run_cli

GOLDEN = ROOT / "plans" / "deepseek-v3.cloudmatrix384.json"
E = 256
MOE = list(range(3, 61))  # DeepSeek-V3: 3 dense layers, then 58 MoE layers


@pytest.fixture(scope="module")
def plan():
    return load_plan(GOLDEN)


@pytest.fixture(scope="module")
def exports(plan):
    return {fmt: ex.export_plan(plan, fmt, plan_file=str(GOLDEN)) for fmt in ex.FORMATS}


def _groups(plan):
    """group name -> (ranks, slots per rank, the plan's slots in engine rank order [L, R])."""
    out = {}
    for name in ("prefill", "decode"):
        phase = plan.phases[name]
        inst = phase.instances[0]
        placement = phase.experts[0]
        dies = plan.topology.dies_per_device
        table = np.array([lp.phy2log for lp in placement.layers]).reshape(len(MOE), -1, placement.slots_per_device)
        order = np.argsort(inst.expert_devices)
        out[name] = (len(inst.expert_devices) * dies, placement.slots_per_device // dies,
                     table[:, order].reshape(len(MOE), -1))
    return out


def _check_table(rows: np.ndarray, ranks: int, spr: int) -> None:
    """[L, R]: ids in range, every expert in every layer, no rank holding one expert twice."""
    assert rows.shape[1] == ranks * spr
    assert rows.min() >= 0 and rows.max() < E
    for row in rows:
        assert set(row.tolist()) == set(range(E))
        per_rank = row.reshape(ranks, spr)
        assert all(len(set(r)) == spr for r in per_rank.tolist())


def _launch(files: dict, group: str) -> str:
    text = files[f"{group}/launch.sh"].decode()
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    return text


def test_sglang_expert_location_indexes_every_decoder_layer(plan, exports):
    files = exports["sglang"].files
    for group, (ranks, spr, table) in _groups(plan).items():
        rows = np.array(json.loads(files[f"{group}/expert_location.json"])["physical_to_logical_map"])
        assert rows.shape == (61, ranks * spr)  # config.num_hidden_layers rows
        assert (rows[MOE] == table).all()
        assert (rows[:3] == np.arange(ranks * spr) % E).all()  # dense rows: SGLang's trivial layout
        _check_table(rows[MOE], ranks, spr)
        text = _launch(files, group)
        for flag in (f"--tp-size {ranks}", f"--ep-size {ranks}", f"--ep-num-redundant-experts {ranks * spr - E}",
                     "--init-expert-location", "--attn-dp-size", f"--disaggregation-mode {group}",
                     "ASCEND_RT_VISIBLE_DEVICES", "--device npu"):
            assert flag in text, flag
    decode = _launch(files, "decode")
    assert "--nnodes 11" in decode and "--speculative-algorithm EAGLE" in decode  # 88 devices, MTP on
    assert "--speculative" not in _launch(files, "prefill")


def test_vllm_state_tensors_are_consistent(plan, exports):
    import torch

    files = exports["vllm"].files
    for group, (ranks, spr, table) in _groups(plan).items():
        doc = json.loads(files[f"{group}/eplb_state.json"])
        p2l = np.array(doc["physical_to_logical_map"])
        l2p = np.array(doc["logical_to_physical_map"])
        count = np.array(doc["logical_replica_count"])
        redundant = ranks * spr - E
        assert doc["num_redundant_experts"] == redundant and doc["moe_layers"] == MOE
        assert p2l.shape == (58, ranks * spr) and l2p.shape == (58, E, redundant + 1) and count.shape == (58, E)
        assert (p2l == table).all()
        _check_table(p2l, ranks, spr)
        assert (count == (l2p >= 0).sum(axis=2)).all() and (count.sum(axis=1) == ranks * spr).all()
        for layer in (0, 57):
            for e in range(E):
                slots = l2p[layer, e, : count[layer, e]]
                assert (p2l[layer, slots] == e).all() and (l2p[layer, e, count[layer, e]:] == -1).all()
        state = torch.load(io.BytesIO(files[f"{group}/eplb_state.pt"]), weights_only=True)
        assert (state["physical_to_logical_map"].numpy() == p2l).all()
        assert (state["logical_to_physical_map"].numpy() == l2p).all()
        text = _launch(files, group)
        assert f"--data-parallel-size {ranks}" in text and "--enable-expert-parallel" in text
        assert "--enable-eplb" not in text.split("\nexec ", 1)[1]  # Ascend: vllm-ascend refuses upstream EPLB
    assert any("no flag to load an initial expert map" in n for n in exports["vllm"].notes)


def test_vllm_ascend_expert_map(plan, exports):
    files = exports["vllm-ascend"].files
    for group, (ranks, spr, table) in _groups(plan).items():
        doc = json.loads(files[f"{group}/expert_map.json"])
        assert doc["moe_layer_count"] == 58 and len(doc["layer_list"]) == 58
        for i, layer in enumerate(doc["layer_list"]):
            assert layer["layer_id"] == i and layer["device_count"] == ranks
            assert [d["device_id"] for d in layer["device_list"]] == list(range(ranks))
            row = np.array([d["device_expert"] for d in layer["device_list"]])
            assert row.shape == (ranks, spr) and (row.reshape(-1) == table[i]).all()
        _check_table(table, ranks, spr)
        text = _launch(files, group)
        assert "expert_map_path" in text and f"--data-parallel-size {ranks}" in text


def test_trtllm_assignments_yaml_and_snippet(plan, exports):
    files = exports["trtllm"].files
    for group, (ranks, spr, table) in _groups(plan).items():
        doc = json.loads(files[f"{group}/moe_load_balancer.json"])
        assert doc["num_slots"] == ranks * spr and doc["layer_updates_per_iter"] == 0
        assignments = doc["initial_global_assignments"]
        assert sorted(map(int, assignments)) == MOE  # keyed by decoder layer id
        rows = np.array([assignments[str(layer)] for layer in MOE])
        assert (rows == table).all()
        _check_table(rows, ranks, spr)
        options = yaml.safe_load(files[f"{group}/extra_llm_api_options.yaml"])
        balancer = options["moe_config"]["load_balancer"]
        assert balancer["num_slots"] == ranks * spr
        assert balancer["initial_global_assignments"] == {int(k): v for k, v in assignments.items()}
        compile(files[f"{group}/moe_load_balancer.py"].decode(), "moe_load_balancer.py", "exec")
        text = _launch(files, group)
        assert f"--tp_size {ranks} --ep_size {ranks}" in text
    assert any("NVIDIA GPUs" in n for n in exports["trtllm"].notes)  # the golden plan is on Ascend


def test_eplb_npy(plan, exports):
    files = exports["eplb"].files
    for group, (ranks, spr, table) in _groups(plan).items():
        phy2log, log2phy, logcnt = (np.load(io.BytesIO(files[f"{group}/{n}.npy"]))
                                    for n in ("phy2log", "log2phy", "logcnt"))
        assert (phy2log == table).all() and logcnt.shape == (58, E)
        assert log2phy.shape == (58, E, logcnt.max())
        assert ((log2phy >= 0).sum(axis=2) == logcnt).all()
        assert all((phy2log[i, log2phy[i, e, : logcnt[i, e]]] == e).all() for i in (0, 57) for e in range(E))
        assert f"{group}/launch.sh" not in files  # EPLB is a format, not an engine


def test_engine_ranks_hold_each_devices_experts(plan, exports):
    """Rank r of the engine runs on the r-th die (ascending device order): same experts as the plan says."""
    doc = json.loads(exports["vllm-ascend"].files["decode/expert_map.json"])
    dies = plan.topology.dies_per_device
    per_device = {a.device: a.experts for a in devices_of(plan) if a.phase == "decode" and a.instance == "decode-0"}
    devices = sorted(per_device)
    for layer in (0, 30):
        ranks = [d["device_expert"] for d in doc["layer_list"][layer]["device_list"]]
        for r, experts in enumerate(ranks):
            device = devices[r // dies]
            spr = len(experts)
            assert tuple(experts) == per_device[device][layer][(r % dies) * spr:(r % dies + 1) * spr]


def test_rank_order_follows_device_ids_when_the_plan_lists_them_otherwise(plan):
    """A plan listing expert devices out of order exports the same device -> experts mapping."""
    phase = plan.decode
    inst = phase.instances[0]
    placement = phase.experts[0]
    S = placement.slots_per_device
    perm = list(reversed(range(len(inst.expert_devices))))
    layers = tuple(dataclasses.replace(lp, phy2log=np.array(lp.phy2log).reshape(-1, S)[perm].reshape(-1),
                                       device_loads=tuple(np.array(lp.device_loads)[perm]))
                   for lp in placement.layers)
    shuffled = dataclasses.replace(placement, layers=layers)
    new_inst = dataclasses.replace(inst, expert_devices=tuple(inst.expert_devices[k] for k in perm), experts=1)
    other = dataclasses.replace(plan, decode=dataclasses.replace(
        phase, instances=(new_inst,) + phase.instances[1:], experts=(placement, shuffled)))
    a = json.loads(ex.export_plan(plan, "sglang").files["decode/expert_location.json"])
    b = json.loads(ex.export_plan(other, "sglang").files["decode-0/expert_location.json"])
    assert a == b


def test_weighted_and_disaggregated_plans_fall_back_with_one_line_each():
    plan = tiny_plan(decode_mode="disaggregated", weighted=True)
    export = ex.export_plan(plan, "sglang")
    assert any("disaggregated MoE-attention" in n for n in export.notes)
    assert any("weighted shares" in n for n in export.notes)
    assert all("\n" not in n for n in export.notes)
    decode = plan.decode.instances[0]
    placement = plan.decode.experts[0]
    rows = np.array(json.loads(export.files["decode/expert_location.json"])["physical_to_logical_map"])
    assert rows.shape[1] == len(decode.expert_devices) * placement.slots_per_device  # the expert devices only
    assert "--tp-size 3" in export.files["decode/launch.sh"].decode()


def test_exports_are_deterministic(plan):
    a = ex.export_plan(plan, "vllm", plan_file="p.json").files
    b = ex.export_plan(plan, "vllm", plan_file="p.json").files
    assert a == b


def test_write_export_is_atomic_and_refuses_foreign_folders(tmp_path, plan, monkeypatch):
    export = ex.export_plan(tiny_plan(), "eplb")
    out = tmp_path / "out"
    ex.write_export(export, out)
    assert (out / "manifest.json").is_file()
    ex.write_export(export, out)  # an earlier export is replaced
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not a podplan export"):
        ex.write_export(export, foreign)
    assert (foreign / "keep.txt").read_text() == "mine"

    calls = {"n": 0}
    real = Path.write_bytes

    def failing(self, data):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", failing)
    fresh = tmp_path / "fresh"
    with pytest.raises(OSError):
        ex.write_export(export, fresh)
    assert not fresh.exists()
    assert {p.name for p in tmp_path.iterdir()} == {"out", "foreign"}  # no temp folder left behind


def test_cli_export_and_bad_input(tmp_path):
    plan_file = tmp_path / "tiny.json"
    plan_file.write_text(tiny_plan(decode_mode="disaggregated").to_json())
    proc = run_cli("export", str(plan_file), "--format", "vllm-ascend", "-o", str(tmp_path / "x"))
    assert proc.returncode == 0, proc.stderr
    assert "disaggregated MoE-attention" in proc.stderr and len(proc.stderr.strip().splitlines()) == 2
    manifest = json.loads((tmp_path / "x" / "manifest.json").read_text())
    assert manifest["format"] == "vllm-ascend" and {g["name"] for g in manifest["groups"]} == {"prefill", "decode"}
    assert (tmp_path / "x" / "decode" / "launch.sh").stat().st_mode & 0o111

    assert_one_line_error(run_cli("export", str(tmp_path / "missing.json"), "--format", "sglang", "-o",
                                  str(tmp_path / "y")), "no such plan file")
    assert not (tmp_path / "y").exists()
    (tmp_path / "file").write_text("")
    assert_one_line_error(run_cli("export", str(plan_file), "--format", "eplb", "-o", str(tmp_path / "file")),
                          "is a file")
