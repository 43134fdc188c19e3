"""A rank runs the staged program's stage modules: in one process, pausing at every routed-experts
stage and resuming with what the rank's expert shards compute.

Experts run locally here (no torch.distributed, except the one in-process worker below), so a
numerics failure points at the interpreter, the KV cache or the expert shards rather than at the
data movement. A toy pass added to the stage-split pipeline shows that what runs is what was split.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.fx as fx

from passes import PASSES, PIPELINES, PassInfo, meta
from passes.expert_decompose import ExpertShard
from passes.graphs import copy_module, stage_module
from passes.manager import PassManager
from planner.frontend import trace as trace_module
from planner.frontend.stages import PIPELINE, new_kv_cache
from runtime.errors import StageError
from runtime.interpreter import ExpertCall, call_stage, failing_node
from runtime.parts import RankParts, RemoteStage, build_full, build_parts
from runtime.reference import greedy
from runtime.spec import prompts_of
from runtime.worker import RankWorker
from tests.runtime.conftest import FAMILIES, colocated, disaggregated, program


def _local_experts(parts: RankParts, call: ExpertCall) -> torch.Tensor:
    """What the exchange does, in one process: one row per (token, k) to the rank's shard, weighted sum back.

    Identity placement: local slot s holds expert s."""
    T, k = call.ids.shape
    rows = call.hidden.reshape(T, -1).repeat_interleave(k, dim=0)
    y = parts.experts[call.layer](rows, call.ids.reshape(-1)).view(T, k, -1)
    return (y * call.weights.reshape(T, k, 1)).sum(dim=1).to(y.dtype)


@torch.no_grad()
def _generate(parts: RankParts, prompts: torch.Tensor, steps: int, microbatches: int):
    """Greedy decoding through the rank interpreter, each microbatch with its own KV cache."""
    chunks = list(prompts.chunk(microbatches))
    interps = [parts.interpreter(rank=0, kv=new_kv_cache(), remote_shared=False, clock={}) for _ in chunks]
    tokens, logits = [], []
    for step in range(steps):
        outs = []
        for interp, ids in zip(interps, chunks):
            interp.begin(ids, f"step {step}")
            while isinstance(r := interp.advance(), ExpertCall):
                interp.resume(_local_experts(parts, r), None)
            outs.append(r[:, -1].float())
        last = torch.cat(outs)
        nxt = last.argmax(-1)
        tokens.append(nxt)
        logits.append(last)
        chunks = list(nxt[:, None].chunk(microbatches))
    return torch.stack(tokens, 1), torch.stack(logits, 1)


@pytest.mark.parametrize("model", FAMILIES)
def test_stage_modules_match_transformers(model):
    spec = colocated(model, ranks=1, prompts=4, prompt_len=6, new_tokens=4, seed=1)
    parts = build_parts(spec, spec.instances[0], 0, torch.device("cpu"), program(spec.model))
    ref_tokens, ref_logits, _ = greedy(spec)
    for m in (1, 2):
        tokens, logits = _generate(parts, prompts_of(spec, parts.vocab), spec.new_tokens, m)
        assert torch.equal(tokens, ref_tokens), (m, tokens, ref_tokens)
        assert float((logits - ref_logits).abs().max()) <= 1e-5


def test_the_clock_is_kept_per_stage_module():
    spec = colocated("tiny-deepseek-v3", ranks=1, prompts=2, prompt_len=3, new_tokens=1)
    parts = build_parts(spec, spec.instances[0], 0, torch.device("cpu"), program(spec.model))
    clock: dict[str, float] = {}
    stages: dict[str, float] = {}
    interp = parts.interpreter(rank=0, kv=new_kv_cache(), remote_shared=False, clock=clock, stage_clock=stages)
    interp.begin(prompts_of(spec, parts.vocab), "prefill")
    with torch.no_grad():
        while isinstance(r := interp.advance(), ExpertCall):
            interp.resume(_local_experts(parts, r), None)
    assert {"embed", "layer0_attention", "layer0_dense_ffn", "layer1_moe_gate", "layer2_shared_experts",
            "head"} <= stages.keys()
    assert not any(name.endswith("routed_experts") for name in stages)  # routed experts run on expert shards
    assert clock.keys() == {"embed", "attention", "dense_ffn", "moe_gate", "shared_experts", "head"}


def test_ranks_keep_only_the_stages_they_run():
    spec = disaggregated("tiny-deepseek-v3", attention=1, experts=2, slots_per_rank=5)
    inst = spec.instances[0]
    attn = build_parts(spec, inst, 0, torch.device("cpu"), program(spec.model))
    expert = build_parts(spec, inst, 2, torch.device("cpu"), program(spec.model))
    layer = attn.moe_layers[0]
    gm = attn.program.gm
    # the attention rank's program: every routed and (remote) shared stage is a stub, the rest are stage modules
    stubs = {name for name, mod in gm.named_children() if isinstance(mod, RemoteStage)}
    assert stubs == {f"layer{i}_{kind}" for i in attn.moe_layers for kind in ("routed_experts", "shared_experts")}
    assert all(isinstance(mod, fx.GraphModule) for name, mod in gm.named_children() if name not in stubs)
    assert not any("experts" in n for n, _ in gm.named_parameters())
    assert attn.experts == {} and attn.shared == {} and attn.params == sum(p.numel() for p in gm.parameters())
    # expert rank 1 of 2 holds slots 5..9 -> logical experts 5, 6, 7, 0, 1 (round robin over 8)
    assert expert.program is None
    stage = expert.experts[layer]
    assert stage.name == f"layer{layer}_routed_experts" and stage.logical.tolist() == [5, 6, 7, 0, 1]
    shard = next(m for m in stage.module.modules() if isinstance(m, ExpertShard))
    assert shard.hosted == (0, 1, 5, 6, 7) and shard.experts.gate_up_proj.shape[0] == 5
    _, model = build_full(spec)
    ref = model.model.layers[layer].mlp.experts.gate_up_proj
    assert torch.equal(shard.experts.gate_up_proj, ref[[0, 1, 5, 6, 7]])
    assert layer in expert.shared and expert.shared[layer].name == f"layer{layer}_shared_experts"
    # an expert row is sent to slot 0 (expert 5): the shard computes expert 5's output for it
    row = torch.randn(1, attn.hidden)
    with torch.no_grad():
        got = stage(row, torch.tensor([0]))
        want = model.model.layers[layer].mlp.experts(row, torch.tensor([[5]]), torch.ones(1, 1))
    assert torch.allclose(got, want, atol=1e-6)
    idle = build_parts(colocated("tiny-deepseek-v3", ranks=1), None, 0, torch.device("cpu"),
                       program("tiny-deepseek-v3"))
    assert idle.program is None and idle.experts == {} and idle.params == 0


def test_a_failing_module_is_reported_with_rank_stage_and_node():
    spec = colocated("tiny-mixtral", ranks=1)
    parts = build_parts(spec, spec.instances[0], 0, torch.device("cpu"), program(spec.model))
    stage = parts.program.gm.get_submodule("layer1_attention")
    (node,) = [n for n in stage.graph.nodes if n.op == "call_module" and meta.role_of(n) == "attention"]
    stage.get_submodule(str(node.target)).forward = lambda *a, **k: (_ for _ in ()).throw(ValueError("boom\nsecond"))
    interp = parts.interpreter(rank=3, kv=new_kv_cache(), remote_shared=False, clock={})
    interp.begin(torch.zeros((1, 2), dtype=torch.long), "decode step 4")
    with pytest.raises(StageError) as info, torch.no_grad():
        while isinstance(r := interp.advance(), ExpertCall):
            interp.resume(_local_experts(parts, r), None)
    assert str(info.value) == ("rank 3, stage decode step 4, while executing lm_model_layers_1_self_attn in "
                               "layer1_attention: ValueError: boom")


def test_the_failing_line_of_a_stage_module_names_its_node():
    def body(x, y):
        a = x + 1
        return (a * y,)

    stage = fx.symbolic_trace(body)
    assert call_stage(stage, torch.ones(2), torch.ones(2))[0].tolist() == [2.0, 2.0]
    with pytest.raises(RuntimeError) as info:
        call_stage(stage, torch.ones(2), torch.ones(3))
    assert failing_node(stage, info.value) == "mul"
    with pytest.raises(TypeError) as info:
        call_stage(stage, torch.ones(2))
    assert failing_node(stage, info.value) == "(call)"


# --- what runs is what was split: a toy pass changes the run -----------------------------------------


def _negate_logits(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    """A toy pass: the head stage returns minus the logits."""
    out = copy_module(gm)
    (call,) = [n for n in out.graph.nodes if n.op == "call_module" and n.target == "head"]
    head = copy_module(stage_module(out, call))
    output = head.graph.output_node()
    (logits,) = output.args[0]
    with head.graph.inserting_before(output):
        neg = head.graph.call_function(torch.neg, (logits,))
    neg.meta = dict(logits.meta)
    output.args = ((neg,),)
    head.recompile()
    out.add_module("head", head)
    return out


@pytest.fixture
def toy_pass(monkeypatch):
    monkeypatch.setitem(PASSES, "negate-logits", PassInfo("negate-logits", _negate_logits, (meta.STAGED,), (), "toy"))
    monkeypatch.setitem(PIPELINES, PIPELINE, (*PIPELINES[PIPELINE], "negate-logits"))


def test_a_pass_added_to_the_pipeline_changes_what_a_rank_runs(toy_pass):
    spec = colocated("tiny-olmoe", ranks=1, prompts=3, prompt_len=4, new_tokens=1, seed=3)
    parts = build_parts(spec, spec.instances[0], 0, torch.device("cpu"), program(spec.model))
    _, ref_logits, _ = greedy(spec)
    _, logits = _generate(parts, prompts_of(spec, parts.vocab), 1, 1)
    assert float((logits + ref_logits).abs().max()) <= 1e-5  # the head stage the pass rewrote ran


def test_a_worker_runs_the_program_the_pipeline_made(toy_pass, tmp_path):
    """The whole worker (setup, exchange, sampling) in this process as a 1-rank gloo group."""
    spec = colocated("tiny-deepseek-v3", ranks=1, prompts=2, prompt_len=3, new_tokens=2, seed=3)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        worker = RankWorker(spec, 0, torch.device("cpu"), program(spec.model))
        worker.setup()
        worker.run()
    finally:
        dist.destroy_process_group()
    ref_tokens, ref_logits, _ = greedy(spec)
    first = torch.stack([worker.results[seq][0][1] for seq in range(spec.prompts)])
    assert float((first + ref_logits[:, 0]).abs().max()) <= 1e-4
    # greedy on minus the logits picks the least likely token
    assert [worker.results[seq][0][0] for seq in range(spec.prompts)] == ref_logits[:, 0].argmin(-1).tolist()
    assert worker.metrics["stage_clock"].keys() >= {"head", "layer1_routed_experts", "layer1_attention"}


def test_a_worker_binds_the_shipped_program_and_never_traces(monkeypatch, tmp_path):
    """The worker gets program.json's document; tracing or running the pass pipeline in it fails the test."""
    spec = colocated("tiny-qwen3-moe", ranks=1, prompts=2, prompt_len=3, new_tokens=2, seed=5)
    doc = program(spec.model)  # what the launcher writes, compiled before the poison
    ref_tokens, ref_logits, _ = greedy(spec)

    def poisoned(*args, **kwargs):
        raise AssertionError("a worker traced the model or re-ran the pass pipeline")

    monkeypatch.setattr(fx.Tracer, "trace", poisoned)
    monkeypatch.setattr(trace_module, "trace_model", poisoned)
    monkeypatch.setattr(PassManager, "run", poisoned)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        worker = RankWorker(spec, 0, torch.device("cpu"), doc)
        worker.setup()
        worker.run()
    finally:
        dist.destroy_process_group()
    tokens = [[worker.results[seq][step][0] for step in range(spec.new_tokens)] for seq in range(spec.prompts)]
    assert tokens == ref_tokens.tolist()
    first = torch.stack([worker.results[seq][0][1] for seq in range(spec.prompts)])
    assert float((first - ref_logits[:, 0]).abs().max()) <= 1e-4
