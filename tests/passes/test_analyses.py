"""cut-analysis, expert-decompose, phases and microbatch on tiny models."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from costmodels import opcount
from costmodels.errors import InputError
from passes import meta
from passes.expert_decompose import ExpertShard, shard_stage
from passes.microbatch import DEFAULT_LANES, Action, MicrobatchSchedule, build_schedule
from planner.frontend.stages import compile_stages, stage_rows
from tests.passes.conftest import staged, traced


def test_cuts_name_what_crosses_each_moe_boundary():
    program = staged("tiny-qwen3-moe")
    shape = program.shape
    into = {c.kind: c for c in program.cuts if c.dst == "layer1_routed_experts"}
    assert set(into) == {"hidden", "routing_ids", "routing_weights"}
    assert into["hidden"].src == "layer1_attention" and into["hidden"].fanout == shape.top_k
    assert into["routing_ids"].src == "layer1_moe_gate" and into["routing_ids"].dtype == "int64"
    assert into["routing_ids"].shapes == ((program.ctx.tokens, shape.top_k),)
    assert sum(c.bytes_bf16 for c in into.values()) == opcount.dispatch_bytes_per_token(shape, 2.0)
    out = [c for c in program.cuts if c.src == "layer1_routed_experts"]
    assert [(c.dst, c.kind) for c in out] == [("head", "expert_out")]
    back = {c.kind for c in program.cuts if c.dst == "layer1_attention"}
    assert {"residual", "expert_out", "context", "state"} <= back
    rows = {r["stage"]: r for r in stage_rows(program)}
    assert rows["layer1_attention"]["cut_in"] == {"residual": shape.hidden * 2, "expert_out": shape.top_k * shape.hidden * 2}


def test_expert_layout_and_shards():
    t, shape = traced("tiny-mixtral", "cpu", 1)
    program = compile_stages(t, shape, batch=1, seq=4)
    layout = program.experts["layer0_routed_experts"]
    assert layout.num_experts == 8 and layout.params_per_expert == shape.params_expert
    assert {name for name, _ in layout.weights} == {"gate_up_proj", "down_proj"}
    stage = program.gm.get_submodule("layer0_routed_experts")
    shard = shard_stage(stage, [6, 1])
    module = next(m for m in shard.modules() if isinstance(m, ExpertShard))
    assert module.hosted == (1, 6)
    assert module.experts.gate_up_proj.shape[0] == 2
    full = next(m for m in stage.modules() if isinstance(m, ExpertShard))
    assert torch.equal(module.experts.down_proj[1], full.experts.down_proj[6])
    hidden = torch.randn(5, shape.hidden)
    ids = torch.tensor([[1, 6], [0, 2], [6, 3], [1, 0], [4, 5]])
    weights = torch.rand(5, 2)
    part = module(hidden, ids, weights)
    assert (part[1] == 0).all() and (part[4] == 0).all() and (part[0] != 0).any()
    with pytest.raises(InputError, match=r"expert ids \[8\] out of range 0..7"):
        full.select([8])


def test_phase_signatures_prefill_and_decode():
    program = staged("tiny-olmoe", batch=2, seq=5)
    prefill, decode = program.phases
    assert (prefill.phase, prefill.batch, prefill.seq, prefill.past) == ("prefill", 2, 5, 0)
    assert (decode.phase, decode.seq, decode.past) == ("decode", 1, 5)
    hidden = program.shape.hidden
    for sig, tokens, keys in ((prefill, 5, 5), (decode, 1, 6)):
        attn = next(s for s in sig.stages if s.stage == "layer1_attention")
        by_name = {i.name: i for i in attn.inputs}
        mask = next(v for k, v in by_name.items() if k.startswith("podplan_causal_mask"))
        assert mask.shape == (2, 1, tokens, keys)
        assert by_name["past_key_values"].dtype == "KVCache"
        assert {(2, tokens, hidden), (2 * tokens, hidden)} <= {o.shape for o in attn.outputs}
        routed = next(s for s in sig.stages if s.stage == "layer1_routed_experts")
        assert routed.inputs[0].shape == (2 * tokens, hidden)
    assert [s.stage for s in prefill.stages] == [k.name for k in program.stages]


def test_schedule_worked_example_of_the_docstring():
    program = staged("tiny-deepseek-v3")
    expected = ("0:emb+a0 | 1:emb+a0,0:f0 | 0:a1+g1,1:f0 | 1:a1+g1,0:x1+s1 | 0:a2+g2,1:x1+s1 | 1:a2+g2,0:x2+s2"
                " | 0:head,1:x2+s2 | 1:head")
    assert program.schedule.format() == expected
    assert MicrobatchSchedule.parse(expected) == program.schedule
    pairs = {(a.format(), b.format()) for a, b in program.schedule.overlaps()}
    assert ("1:a1+g1", "0:x1+s1") in pairs  # attention of microbatch 1 hides experts of microbatch 0


def _program_stages(layers: int, dense: int) -> list[meta.StageKey]:
    keys = [meta.StageKey(None, "embed")]
    for layer in range(layers):
        keys.append(meta.StageKey(layer, "attention"))
        if layer < dense:
            keys.append(meta.StageKey(layer, "dense_ffn"))
        else:
            keys += [meta.StageKey(layer, k) for k in ("moe_gate", "routed_experts", "shared_experts")]
    return keys + [meta.StageKey(None, "head")]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(layers=st.integers(1, 6), dense=st.integers(0, 3), m=st.integers(1, 5), gate_on_e=st.booleans())
def test_schedule_is_complete_ordered_and_reversible(layers, dense, m, gate_on_e):
    lanes = dict(DEFAULT_LANES, moe_gate="E" if gate_on_e else "A")
    stages = _program_stages(layers, min(dense, layers))
    sched = build_schedule(stages, m, lanes)
    assert MicrobatchSchedule.parse(sched.format()) == sched
    for i in range(m):
        ran = [s for tick in sched.ticks for a in tick if a.microbatch == i for s in a.stages]
        assert ran == stages  # every stage once, in program order
    for tick in sched.ticks:
        tick_lanes = [lanes[a.stages[0].kind] for a in tick]
        assert len(tick_lanes) == len(set(tick_lanes))  # one action per lane per tick
        assert all(len({lanes[s.kind] for s in a.stages}) == 1 for a in tick)
    steps = sum(1 for _ in _steps(stages, lanes))
    if m == 2:
        assert len(sched.ticks) == steps + 1  # ping-pong: two microbatches cost one extra tick


def _steps(stages, lanes):
    last = None
    for s in stages:
        if lanes[s.kind] != last:
            last = lanes[s.kind]
            yield s


def test_schedule_parse_errors_name_tick_and_action():
    with pytest.raises(InputError, match=r"schedule tick 1: bad action '0-a1'; expected MB:STAGE"):
        MicrobatchSchedule.parse("0:emb | 0-a1")
    with pytest.raises(InputError, match=r"schedule tick 0: bad stage code 'q3'"):
        MicrobatchSchedule.parse("0:q3")
    assert Action(3, (meta.StageKey(12, "routed_experts"),)).format() == "3:x12"
