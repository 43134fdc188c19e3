"""The runtime's pure parts: sequence assignment, replica choice, KV packing, programs and the dry run."""

from __future__ import annotations

import pytest
import torch

from runtime.errors import SpecError
from planner.frontend.stages import new_kv_cache
from runtime.kv import kv_from_rows, kv_rows, pack, payload_numel, unpack
from runtime.routing import ReplicaTable, token_keys, uniform_of
from runtime.schedule import Op, dry_run, programs
from runtime.spec import (InstanceSpec, LayerSlots, RunSpec, equal_shares, kv_routes, make_instance,
                          microbatches_of, sequences_of, split, steps_of)


def _pd_spec(prompts: int = 7, microbatches: int = 2) -> RunSpec:
    kw = dict(num_experts=8, moe_layers=[0, 1], microbatches=microbatches)
    p = make_instance("p0", ("prefill",), [0, 1], [0, 1], **kw)
    d = make_instance("d0", ("decode",), [2, 3, 4], [5, 6], shared=[5, 6], **kw)
    return RunSpec("tiny-mixtral", 7, (p, d), prompts=prompts, new_tokens=3)


def test_split_is_contiguous_and_balanced():
    assert [list(r) for r in split(7, 3)] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [list(r) for r in split(2, 3)] == [[0], [1], []]
    assert microbatches_of([4, 5, 6], 2) == [[4, 5], [6]]


def test_sequences_and_kv_routes_cover_every_prompt_once():
    spec = _pd_spec()
    pre, dec = sequences_of(spec, "prefill"), sequences_of(spec, "decode")
    assert pre == {0: [0, 1, 2, 3], 1: [4, 5, 6]}
    assert dec == {2: [0, 1, 2], 3: [3, 4], 4: [5, 6]}
    routes = kv_routes(spec)
    assert routes == [(0, 2, [0, 1, 2]), (0, 3, [3]), (1, 3, [4]), (1, 4, [5, 6])]
    assert steps_of(spec, spec.instances[0]) == [0] and steps_of(spec, spec.instances[1]) == [1, 2]


def test_spec_json_round_trip():
    spec = _pd_spec()
    assert RunSpec.from_json(spec.to_json()) == spec


def test_replica_choice_follows_shares_and_is_deterministic():
    # expert 0 has replicas in slots 0 (share 2/3) and 2 (1/3); expert 1 only slot 1
    lp = LayerSlots(0, (0, 1, 0), (2 / 3, 1.0, 1 / 3))
    table = ReplicaTable(lp, num_experts=2)
    keys = token_keys(list(range(30)), 0, 100)  # 3000 tokens
    ids = torch.zeros((keys.shape[0], 1), dtype=torch.int64)
    slots = table.pick(ids, uniform_of(keys)).squeeze(1)
    frac = float((slots == 0).double().mean())
    assert abs(frac - 2 / 3) < 0.01, frac
    assert set(slots.tolist()) == {0, 2}
    assert torch.equal(slots, table.pick(ids, uniform_of(keys)).squeeze(1))
    ids1 = torch.ones((5, 1), dtype=torch.int64)
    assert table.pick(ids1, uniform_of(keys[:5])).unique().tolist() == [1]


def test_replica_with_zero_share_gets_no_tokens():
    lp = LayerSlots(0, (0, 0), (1.0, 0.0))
    table = ReplicaTable(lp, num_experts=1)
    keys = token_keys(list(range(10)), 0, 50)
    slots = table.pick(torch.zeros((keys.shape[0], 1), dtype=torch.int64), uniform_of(keys))
    assert slots.unique().tolist() == [0]


def test_equal_shares():
    assert equal_shares((0, 1, 0, 2, 0)) == (1 / 3, 1.0, 1 / 3, 1.0, 1 / 3)


def test_kv_pack_round_trip_and_store_appends():
    store = new_kv_cache()  # the staged program's cache: one class for the passes and the runtime
    k, v = torch.randn(3, 2, 4, 5), torch.randn(3, 2, 4, 5)
    store.update(k, v, 0)
    k2, _ = store.update(torch.randn(3, 2, 1, 5), torch.randn(3, 2, 1, 5), 0)
    store.update(torch.randn(3, 1, 5, 2), torch.randn(3, 1, 5, 2), 1)
    assert k2.shape == (3, 2, 5, 5) and store.get_seq_length() == 5
    tensors = kv_rows(store, [0, 2])
    header, payload = pack(tensors)
    assert payload.numel() == payload_numel(header)
    back = unpack(header, payload)
    assert all(torch.equal(a, b) for a, b in zip(tensors, back))
    again = kv_from_rows([0, 1], back)
    assert torch.equal(again.layers[1][0], store.layers[1][0][[0, 2]]) and again.get_seq_length(1) == 5


def test_programs_of_every_layout_pass_the_dry_run():
    kw = dict(num_experts=8, moe_layers=[0, 1])
    colo = make_instance("c", ("prefill", "decode"), [0, 1, 2, 3], [0, 1, 2, 3], microbatches=2, **kw)
    afd = make_instance("a", ("prefill", "decode"), [0, 1], [2, 3], microbatches=3, shared=[2, 3], **kw)
    for spec in (RunSpec("m", 4, (colo,), new_tokens=3), RunSpec("m", 5, (afd,), new_tokens=2), _pd_spec()):
        progs = programs(spec, [0, 1])
        groups = {inst.name: inst.ranks for inst in spec.instances}
        assert dry_run(progs, groups) > 0
    # an idle rank (4 in the 5-rank spec) only joins the final gather
    assert programs(RunSpec("m", 5, (afd,), new_tokens=2), [0, 1])[4] == [Op("coll", "gather results", "world")]


def test_program_order_microbatches_overlap():
    kw = dict(num_experts=8, moe_layers=[3])
    inst = make_instance("c", ("prefill", "decode"), [0, 1], [0, 1], microbatches=2, **kw)
    prog = programs(RunSpec("m", 2, (inst,), new_tokens=1), [3])[0]
    # both microbatches are dispatched before either is combined: their exchanges overlap
    assert [op.key for op in prog] == [
        "step 0 layer 3 mb 0 dispatch", "step 0 layer 3 mb 1 dispatch",
        "step 0 layer 3 mb 0 combine", "step 0 layer 3 mb 1 combine", "gather results"]


def test_dry_run_rejects_a_send_recv_cycle():
    progs = {0: [Op("recv", "kv", peer=1), Op("send", "kv", peer=1)],
             1: [Op("recv", "kv", peer=0), Op("send", "kv", peer=0)]}
    with pytest.raises(SpecError, match=r"deadlock: rank 0 waits at recv kv from rank 1; rank 1 waits at recv kv"):
        dry_run(progs, {})


def test_dry_run_rejects_collectives_in_different_orders():
    a, b = Op("coll", "layer 1", "g"), Op("coll", "layer 2", "g")
    with pytest.raises(SpecError, match="collective order mismatch on group g: rank 0 issues 'layer 1' while rank 1"):
        dry_run({0: [a, b], 1: [b, a]}, {"g": (0, 1)})


def test_dry_run_rejects_a_missing_partner():
    progs = {0: [Op("send", "kv", peer=1)], 1: []}
    with pytest.raises(SpecError, match="rank 0 waits at send kv to rank 1"):
        dry_run(progs, {})


def test_instance_slots_of():
    inst = InstanceSpec("x", ("prefill", "decode"), (0,), (2, 1), 3, (), 1, ())
    assert list(inst.slots_of(1)) == [3, 4, 5] and list(inst.slots_of(0)) == [] and inst.ranks == (0, 1, 2)
