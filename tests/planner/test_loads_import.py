"""Measured expert loads in: SGLang dumps, vLLM EPLB state, plain files; a wrong shape is one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from costmodels.errors import InputError
from planner.balance.loads import read_loads
from planner.ir.plan import load_plan
from tests.conftest import assert_one_line_error, run_cli

# tiny-deepseek-v3: 3 decoder layers, layer 0 dense, MoE layers 1-2, 8 routed experts
LAYERS, MOE, E = 3, 2, 8
RNG = np.random.default_rng(7)
MOE_LOADS = RNG.integers(1, 100, size=(MOE, E)).astype(np.float64)


def _all_layers(loads: np.ndarray) -> np.ndarray:
    """SGLang's layout: one row per decoder layer, the dense layer's row zero."""
    return np.concatenate([np.zeros((1, E)), loads])


def test_sglang_dump_over_all_decoder_layers(tmp_path):
    path = tmp_path / "expert_distribution.pt"
    torch.save({"logical_count": torch.tensor(_all_layers(MOE_LOADS), dtype=torch.int64), "rank": 0}, path)
    assert (read_loads(str(path), layers=MOE, experts=E) == MOE_LOADS).all()


def test_sglang_dump_with_a_time_axis(tmp_path):
    steps = np.stack([_all_layers(MOE_LOADS) / 2, _all_layers(MOE_LOADS) / 2])  # [T, L, E]
    path = tmp_path / "dump.pt"
    torch.save({"logical_count": torch.tensor(steps)}, path)
    assert np.allclose(read_loads(str(path), layers=MOE, experts=E), MOE_LOADS)


def test_sglang_init_expert_location_json(tmp_path):
    path = tmp_path / "location.json"
    path.write_text(json.dumps({"logical_count": MOE_LOADS.tolist()}))
    assert (read_loads(str(path), layers=MOE, experts=E) == MOE_LOADS).all()


def test_vllm_eplb_window_mapped_to_logical_experts(tmp_path):
    # 10 physical slots per layer over 8 experts: experts 0 and 1 have two replicas
    p2l = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 0, 1]] * MOE)
    physical = np.zeros((MOE, 10))
    for layer in range(MOE):
        for slot, e in enumerate(p2l[layer]):
            physical[layer, slot] = MOE_LOADS[layer, e] / (2 if e < 2 else 1)
    window = np.stack([physical / 4] * 4)  # [W, L, P]
    path = tmp_path / "eplb_state.pt"
    torch.save({"expert_load_window": torch.tensor(window), "physical_to_logical_map": torch.tensor(p2l)}, path)
    assert np.allclose(read_loads(str(path), layers=MOE, experts=E), MOE_LOADS)


def test_plain_npy_csv_json(tmp_path):
    np.save(tmp_path / "l.npy", MOE_LOADS)
    (tmp_path / "l.csv").write_text("\n".join(",".join(f"{x:g}" for x in row) for row in MOE_LOADS) + "\n")
    (tmp_path / "l.json").write_text(json.dumps(MOE_LOADS.tolist()))
    for name in ("l.npy", "l.csv", "l.json"):
        assert (read_loads(str(tmp_path / name), layers=MOE, experts=E) == MOE_LOADS).all(), name


def test_shape_mismatch_names_both_shapes(tmp_path):
    np.save(tmp_path / "wrong.npy", np.ones((5, E)))
    with pytest.raises(InputError, match=r"file \[5, 8\], model \[2, 8\]"):
        read_loads(str(tmp_path / "wrong.npy"), layers=MOE, experts=E)
    np.save(tmp_path / "experts.npy", np.ones((MOE, 16)))
    with pytest.raises(InputError, match=r"file \[2, 16\], model \[2, 8\]"):
        read_loads(str(tmp_path / "experts.npy"), layers=MOE, experts=E)
    # a busy dense row is not silently dropped: 3 non-zero rows for 2 MoE layers stay a mismatch
    np.save(tmp_path / "dense.npy", np.ones((LAYERS, E)))
    with pytest.raises(InputError, match=r"file \[3, 8\], model \[2, 8\]"):
        read_loads(str(tmp_path / "dense.npy"), layers=MOE, experts=E)


def test_compile_and_balance_take_an_sglang_dump(tmp_path):
    dump = tmp_path / "dump.pt"
    torch.save({"logical_count": torch.tensor(_all_layers(MOE_LOADS))}, dump)
    out = tmp_path / "plan.json"
    proc = run_cli("compile", "tiny-deepseek-v3", "--topology", "local:8", "--decode-devices", "4",
                   "--prefill-devices", "2", "--loads", str(dump), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    plan = load_plan(out)
    assert plan.provenance.options["loads"] == str(dump)
    # the plan's device loads are the dump's tokens placed by the balancer
    placement = plan.decode.experts[0]
    for i, lp in enumerate(placement.layers):
        assert sum(lp.device_loads) == pytest.approx(MOE_LOADS[i].sum(), rel=1e-4)

    proc = run_cli("balance", str(dump), "--devices", "2", "--slots-per-device", "5", "--layers", "2",
                   "--experts", "8", "-o", str(tmp_path / "b.json"))
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads((tmp_path / "b.json").read_text())["phy2log"]) == MOE


def test_compile_refuses_loads_of_another_model_in_one_line(tmp_path):
    wrong = tmp_path / "deepseek.npy"
    np.save(wrong, np.ones((58, 256)))
    out = tmp_path / "plan.json"
    proc = run_cli("compile", "tiny-deepseek-v3", "--topology", "local:8", "--loads", str(wrong), "-o", str(out))
    assert_one_line_error(proc, "file [58, 256], model [2, 8]")
    assert not out.exists()
