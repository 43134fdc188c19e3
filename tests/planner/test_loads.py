"""LOADS inputs: files, SGLang / vLLM dumps, seeded generators, and one-line refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from costmodels.errors import InputError
from planner.balance.loads import GENERATED_TOKENS, check_loads, generate_loads, load_file, read_loads

MATRIX = np.array([[3.0, 0.0, 5.0], [1.0, 2.0, 4.0]])


def test_npy_json_csv_read_the_same_matrix(tmp_path):
    np.save(tmp_path / "l.npy", MATRIX)
    (tmp_path / "l.json").write_text(json.dumps(MATRIX.tolist()))
    (tmp_path / "l.csv").write_text("e0,e1,e2\n3,0,5\n1,2,4\n")
    for name in ("l.npy", "l.json", "l.csv"):
        assert load_file(tmp_path / name).tolist() == MATRIX.tolist()


def test_sglang_json_dump_sums_over_steps(tmp_path):
    steps = np.stack([MATRIX, 2 * MATRIX])  # [T, L, E]
    (tmp_path / "dump.json").write_text(json.dumps({"logical_count": steps.tolist()}))
    assert load_file(tmp_path / "dump.json").tolist() == (3 * MATRIX).tolist()


def test_torch_dumps_sglang_and_vllm(tmp_path):
    torch.save({"logical_count": torch.tensor(MATRIX)}, tmp_path / "sglang.pt")
    assert load_file(tmp_path / "sglang.pt").tolist() == MATRIX.tolist()
    # vLLM: loads per physical slot over a window, mapped back to logical experts.
    window = torch.tensor([[[1.0, 2.0, 3.0, 4.0]], [[1.0, 1.0, 1.0, 1.0]]])  # [W=2, L=1, P=4]
    p2l = torch.tensor([[0, 1, 0, 2]])
    torch.save({"expert_load_window": window, "physical_to_logical_map": p2l}, tmp_path / "vllm.pt")
    assert load_file(tmp_path / "vllm.pt").tolist() == [[6.0, 3.0, 5.0]]
    torch.save(torch.tensor(MATRIX), tmp_path / "plain.pt")
    assert load_file(tmp_path / "plain.pt").tolist() == MATRIX.tolist()


def test_generators_are_seeded_and_shaped():
    for spec in ("uniform", "zipf:1.2", "hot:4"):
        a = generate_loads(spec, 3, 16, seed=7)
        assert a.shape == (3, 16)
        assert (a.sum(axis=1) == GENERATED_TOKENS).all()
        assert np.array_equal(a, generate_loads(spec, 3, 16, seed=7))
        assert not np.array_equal(a, generate_loads(spec, 3, 16, seed=8))


def test_zipf_skew_and_hot_experts():
    flat = np.sort(generate_loads("zipf:0.0", 1, 64, seed=0)[0])
    steep = np.sort(generate_loads("zipf:1.5", 1, 64, seed=0)[0])
    assert steep[-1] > 4 * flat[-1]
    hot = generate_loads("hot:4", 1, 64, seed=0)[0]
    assert (hot > 3 * np.median(hot)).sum() == 4


def test_read_loads_checks_the_model_shape(tmp_path):
    np.save(tmp_path / "l.npy", MATRIX)
    assert read_loads(str(tmp_path / "l.npy"), layers=2, experts=3).shape == (2, 3)
    with pytest.raises(InputError, match="3 experts per layer but the model has 256"):
        read_loads(str(tmp_path / "l.npy"), experts=256)
    with pytest.raises(InputError, match="2 layers but the model has 58"):
        read_loads(str(tmp_path / "l.npy"), layers=58)


@pytest.mark.parametrize(
    "raw, message",
    [
        ([[1.0, float("nan")]], "not a finite number"),
        ([[1.0, -2.0]], "negative"),
        ([1.0, 2.0], "expected a \\[layers, experts\\] matrix"),
        ([[1.0, 2.0], [3.0]], "ragged"),
        ([["a", "b"]], "numeric"),
    ],
)
def test_bad_matrices_are_refused(raw, message):
    with pytest.raises(InputError, match=message):
        check_loads(raw)


def test_bad_files_and_specs_are_refused(tmp_path):
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "keys.json").write_text('{"something": 1}')
    (tmp_path / "bad.csv").write_text("1,2\nx,y\n")
    (tmp_path / "l.txt").write_text("1 2")
    cases = {
        str(tmp_path / "missing.npy"): "no such file",
        str(tmp_path / "bad.npy"): "cannot read",
        str(tmp_path / "bad.json"): "cannot read",
        str(tmp_path / "keys.json"): "no load matrix found",
        str(tmp_path / "bad.csv"): "row 2 is not all numbers",
        str(tmp_path / "l.txt"): "unknown file type",
        "zipf:abc": "zipf:S needs an exponent",
        "hot:999": "hot:K needs an integer",
        "pareto:2": "no such file",
    }
    for spec, message in cases.items():
        with pytest.raises(InputError, match=message):
            read_loads(spec, layers=2, experts=16)
        # One line each: the CLI prints it as is.
    with pytest.raises(InputError, match="--layers L --experts E"):
        read_loads("zipf:1.2")
