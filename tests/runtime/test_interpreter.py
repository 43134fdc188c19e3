"""The stage interpreter in one process: pause at every MoE layer, resume with the experts' output.

Experts run locally here (no torch.distributed), so a numerics failure points at the interpreter,
the KV store or the expert slicing rather than at the data movement.
"""

from __future__ import annotations

import pytest
import torch

from runtime.errors import StageError
from runtime.interpreter import ExpertCall, StageInterpreter
from runtime.kv import KVStore
from runtime.parts import build_parts
from runtime.reference import greedy
from runtime.spec import prompts_of
from tests.runtime.conftest import FAMILIES, colocated, disaggregated


@torch.no_grad()
def _generate(parts, prompts: torch.Tensor, steps: int, microbatches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding through the interpreter, each microbatch with its own KV cache."""
    chunks = list(prompts.chunk(microbatches))
    interps = [StageInterpreter(parts.traced, parts.gmap, rank=0, kv=KVStore(), remote_shared=False, clock={})
               for _ in chunks]
    tokens, logits = [], []
    for step in range(steps):
        outs = []
        for interp, ids in zip(interps, chunks):
            interp.begin(ids, f"step {step}")
            while isinstance(r := interp.advance(), ExpertCall):
                # identity placement: local slot s holds expert s
                interp.resume(parts.experts[r.layer](r.hidden, r.ids, r.weights), None)
            outs.append(r[:, -1].float())
        last = torch.cat(outs)
        nxt = last.argmax(-1)
        tokens.append(nxt)
        logits.append(last)
        chunks = list(nxt[:, None].chunk(microbatches))
    return torch.stack(tokens, 1), torch.stack(logits, 1)


@pytest.mark.parametrize("model", FAMILIES)
def test_interpreter_matches_transformers(model):
    spec = colocated(model, ranks=1, prompts=4, prompt_len=6, new_tokens=4, seed=1)
    parts = build_parts(spec, spec.instances[0], 0, torch.device("cpu"))
    ref_tokens, ref_logits, _ = greedy(spec)
    for m in (1, 2):
        tokens, logits = _generate(parts, prompts_of(spec, parts.vocab), spec.new_tokens, m)
        assert torch.equal(tokens, ref_tokens), (m, tokens, ref_tokens)
        assert float((logits - ref_logits).abs().max()) <= 1e-5


def test_ranks_keep_only_what_they_own():
    spec = disaggregated("tiny-deepseek-v3", attention=1, experts=2, slots_per_rank=5)
    inst = spec.instances[0]
    attn = build_parts(spec, inst, 0, torch.device("cpu"))
    expert = build_parts(spec, inst, 2, torch.device("cpu"))
    names = [n for n, _ in attn.traced.gm.named_parameters()]
    assert names and not any("experts" in n for n in names)  # routed and (remote) shared experts are gone
    assert attn.experts == {} and attn.shared == {}
    layer = attn.moe_layers[0]
    sliced = expert.experts[layer]
    assert sliced.gate_up_proj.shape[0] == 5 and sliced.num_experts == 5
    # expert rank 1 of 2 holds slots 5..9 -> logical experts 5, 6, 7, 0, 1 (round robin over 8)
    full = build_parts(colocated("tiny-deepseek-v3", ranks=1), None, 0, torch.device("cpu"))
    assert full.traced is None and full.experts == {}
    from runtime.parts import build_full

    _, model = build_full(spec)
    ref = model.model.layers[layer].mlp.experts.gate_up_proj
    assert torch.equal(sliced.gate_up_proj, ref[[5, 6, 7, 0, 1]])
    assert layer in expert.shared and expert.traced is None


def test_a_failing_module_is_reported_with_rank_stage_and_node():
    spec = colocated("tiny-mixtral", ranks=1)
    parts = build_parts(spec, spec.instances[0], 0, torch.device("cpu"))
    attn = parts.traced.gm.get_submodule("lm.model.layers.1.self_attn")
    attn.forward = lambda *a, **k: (_ for _ in ()).throw(ValueError("boom\nsecond line"))
    interp = StageInterpreter(parts.traced, parts.gmap, rank=3, kv=KVStore(), remote_shared=False, clock={})
    interp.begin(torch.zeros((1, 2), dtype=torch.long), "decode step 4")
    with pytest.raises(StageError) as info, torch.no_grad():
        while isinstance(r := interp.advance(), ExpertCall):
            interp.resume(parts.experts[r.layer](r.hidden, r.ids, r.weights), None)
    assert str(info.value) == ("rank 3, stage decode step 4, while executing lm_model_layers_1_self_attn: "
                               "ValueError: boom")
