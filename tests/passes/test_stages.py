"""classify + split: the stage-assignment rule, metadata through the split, full DeepSeek-V3 on meta."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from costmodels import opcount
from passes.errors import UnsupportedModelError
from costmodels.model_shape import ModelShape
from passes import meta
from passes.classify import classify
from passes.context import PassContext
from passes.manager import PassManager
from planner.frontend.stages import compile_stages, stage_counts, stage_rows
from tests.passes.conftest import staged, traced

KEYS = (meta.ROLE, meta.LAYER, meta.MODULE, meta.COST, meta.STAGE, meta.STAGE_LAYER)


def _stage_of(program, node_name: str) -> str:
    t = program.gm
    for call in t.graph.nodes:
        if call.op == "call_module" and any(n.name == node_name for n in t.get_submodule(call.target).graph.nodes
                                            if n.op not in ("placeholder", "output")):
            return str(call.target)
    raise KeyError(node_name)


def test_deepseek_v3_full_size_stages_on_meta():
    t, shape = traced("deepseek-v3")
    program = compile_stages(t, shape, batch=1, seq=16)
    assert stage_counts(program) == {"embed": 1, "attention": 61, "moe_gate": 58, "dense_ffn": 3,
                                     "routed_experts": 58, "shared_experts": 58, "head": 1}
    rows = {r["stage"]: r for r in stage_rows(program)}
    routed = rows["layer10_routed_experts"]
    assert routed["params"] == 256 * shape.params_expert
    assert routed["cut_in_bytes_per_token"] == opcount.dispatch_bytes_per_token(shape, 2.0) == 8 * (7168 * 2 + 8)
    assert routed["cut_in_bytes_per_token_int8"] == opcount.dispatch_bytes_per_token(shape, 1.0, 4.0)
    assert routed["cut_out_bytes_per_token"] == opcount.combine_bytes_per_token(shape, 2.0)
    assert rows["layer0_dense_ffn"]["cut_in"] == {"hidden": 7168 * 2}
    assert sum(r["params"] for r in rows.values()) == shape.params_total
    layout = program.experts["layer3_routed_experts"]
    assert layout.num_experts == 256 and layout.params_per_expert == shape.params_expert


def test_metadata_survives_the_split():
    t, shape = traced("tiny-deepseek-v3")
    ctx = PassContext(shape=shape, batch=1, seq=4)
    before = PassManager(["kv-cache", "annotate", "classify"]).run(t.gm, ctx)
    after = PassManager(["split"]).run(before, ctx)
    inner = {}
    for call in after.graph.nodes:
        if call.op == "call_module":
            for n in after.get_submodule(call.target).graph.nodes:
                if n.op not in ("placeholder", "output"):
                    inner[n.name] = (n, str(call.target))
    compute = [n for n in before.graph.nodes if n.op not in ("placeholder", "output")]
    assert len(inner) == len(compute)
    for node in compute:
        copy, stage = inner[node.name]
        assert all(copy.meta[k] == node.meta[k] for k in KEYS), node.name
        assert stage == meta.stage_key_of(node).name
    # the stage call nodes carry the stages' totals
    total = sum(meta.cost_of(n).params for n in after.graph.nodes if n.op == "call_module")
    assert total == sum(p.numel() for p in t.gm.parameters())


def test_stage_assignment_rule_on_deepseek_family():
    program = staged("tiny-deepseek-v3")
    assert _stage_of(program, "lm_model_layers_0_input_layernorm") == "layer0_attention"  # rule 3
    assert _stage_of(program, "lm_model_layers_1_post_attention_layernorm") == "layer1_attention"  # rule 1
    assert _stage_of(program, "getitem_7") == "layer1_moe_gate"  # the router's expert ids
    assert _stage_of(program, "add_5") == "layer2_attention"  # combine opens the next attention (rule 2)
    assert _stage_of(program, "add_8") == "head" and _stage_of(program, "lm_model_norm") == "head"
    assert _stage_of(program, "lm_model_rotary_emb") == "embed"
    # FFN-side stages hold only their module: the routed experts stay a pure sum over experts
    for name in ("layer1_routed_experts", "layer1_shared_experts", "layer0_dense_ffn"):
        body = [n for n in program.gm.get_submodule(name).graph.nodes if n.op not in ("placeholder", "output")]
        assert len(body) == 1 and body[0].op == "call_module", name


def _toy_shape() -> ModelShape:
    return ModelShape(name="toy", num_layers=1, moe_layers=(0,), hidden=4, vocab=4, attention="gqa",
                      num_heads=1, num_kv_heads=1, head_dim=4)


def test_classify_rejects_a_structure_it_cannot_order():
    """A router fed by the FFN's output (after the combine) would need a stage to run before itself."""
    root = nn.Module()
    root.attn, root.ffn, root.gate = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
    g = fx.Graph()
    x = g.placeholder("x")
    a = g.call_module("attn", (x,))
    f = g.call_module("ffn", (a,))
    mix = g.call_function(torch.add, (a, f))
    g.output(g.call_module("gate", (mix,)))
    roles = {"x": ("other", None), "attn": ("attention", 0), "ffn": ("dense_ffn", 0), "add": ("other", 0),
             "gate": ("moe_gate", 0), "output": ("other", None)}
    for n in g.nodes:
        n.meta[meta.ROLE], n.meta[meta.LAYER] = roles[n.name]
    with pytest.raises(UnsupportedModelError, match=r"'add' in stage head feeds 'gate' in the earlier stage layer0_moe_gate"):
        classify(fx.GraphModule(root, g), PassContext(shape=_toy_shape()))
