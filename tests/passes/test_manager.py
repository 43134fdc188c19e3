"""The pass manager: order checks, lint after every pass, failures naming the pass, dumps, timings."""

from __future__ import annotations

import operator

import pytest
import torch

from passes import get_pipeline, meta
from passes.context import PassContext
from passes.manager import LintError, PassError, PassManager, verify
from tests.passes.conftest import traced


def _ctx(shape, **kw):
    return PassContext(shape=shape, batch=1, seq=4, **kw)


def test_wrong_order_names_the_missing_key_and_the_pass_to_run():
    t, shape = traced("tiny-mixtral")
    with pytest.raises(PassError, match=r"split needs 'podplan.stage' on every node \(node 'input_ids' has none\); run 'classify' first"):
        PassManager(["split"]).run(t.gm, _ctx(shape))
    with pytest.raises(PassError, match=r"cut-analysis needs 'podplan.staged' on the graph; run 'split' first"):
        PassManager(["annotate", "cut-analysis"]).run(t.gm, _ctx(shape))


def test_failure_names_the_pass_and_the_passes_before_it():
    t, shape = traced("tiny-mixtral")
    ctx = _ctx(shape, options={"microbatch": {"microbatches": 0}})
    with pytest.raises(PassError) as err:
        PassManager(get_pipeline("stage-split")).run(t.gm, ctx)
    msg = str(err.value)
    assert msg.startswith("pass 'microbatch' (after kv-cache, annotate, classify, split, cut-analysis, expert-decompose, phases) failed")
    assert "0 microbatches; use at least 1" in msg and "\n" not in msg


def test_pipeline_times_every_pass_and_leaves_the_input_graph_alone():
    t, shape = traced("tiny-deepseek-v3")
    before = t.gm.code
    metas = [dict(n.meta) for n in t.gm.graph.nodes]
    manager = PassManager(get_pipeline("stage-split"))
    out = manager.run(t.gm, _ctx(shape))
    assert [r.name for r in manager.records] == list(get_pipeline("stage-split"))
    assert all(r.seconds >= 0 for r in manager.records)
    assert t.gm.code == before and [dict(n.meta) for n in t.gm.graph.nodes] == metas
    assert out is not t.gm and out.meta[meta.STAGED]


def test_dump_after_prints_the_graph_after_that_pass():
    t, shape = traced("tiny-olmoe")
    dumps: list[str] = []
    PassManager(get_pipeline("stage-split"), dump_after="classify", dump=dumps.append).run(t.gm, _ctx(shape))
    assert len(dumps) == 1
    text = dumps[0]
    assert text.startswith("// after pass 'classify'")
    assert "stage=layer1_routed_experts" in text and "role=routed_experts" in text
    dumps.clear()
    PassManager(get_pipeline("stage-split"), dump_after="split", dump=dumps.append).run(t.gm, _ctx(shape))
    assert "\nstage layer0_attention:" in dumps[0] and "\nstage head:" in dumps[0]
    with pytest.raises(PassError, match="not in this pipeline"):
        PassManager(["annotate"], dump_after="split")


@pytest.fixture(scope="module")
def staged_gm():
    t, shape = traced("tiny-qwen3-moe")
    return PassManager(get_pipeline("stage-split")).run(t.gm, _ctx(shape))


def test_lint_accepts_the_staged_program(staged_gm):
    verify(staged_gm)


def test_lint_catches_compute_at_the_top_level(staged_gm):
    from passes.graphs import copy_module

    broken = copy_module(staged_gm)
    getitem = next(n for n in broken.graph.nodes if n.op == "call_function")
    with broken.graph.inserting_after(getitem):
        extra = broken.graph.call_function(torch.relu, (getitem,))
    extra.meta.update(getitem.meta)
    with pytest.raises(LintError, match=r"top-level node 'relu' \(call_function relu\) computes outside any stage"):
        verify(broken)


def test_lint_catches_a_node_in_the_wrong_stage(staged_gm):
    from passes.graphs import copy_module

    broken = copy_module(staged_gm)
    stage = copy_module(broken.get_submodule("layer1_attention"))
    node = next(n for n in stage.graph.nodes if n.op == "call_module")
    node.meta[meta.STAGE] = "moe_gate"
    broken.add_module("layer1_attention", stage)
    with pytest.raises(LintError, match=r"inside stage layer1_attention is classified layer1_moe_gate; stage boundaries must be explicit"):
        verify(broken)


def test_lint_catches_torch_lint_errors_and_untagged_nodes(staged_gm):
    from passes.graphs import copy_module

    broken = copy_module(staged_gm)
    calls = [n for n in broken.graph.nodes if n.op == "call_module"]
    calls[0].args = (calls[1],) + tuple(calls[0].args[1:])  # use before definition
    with pytest.raises(LintError, match="torch.fx lint failed"):
        verify(broken)
    t, _ = traced("tiny-qwen3-moe")
    untagged = copy_module(t.gm)
    del next(iter(untagged.graph.nodes)).meta[meta.ROLE]
    with pytest.raises(LintError, match=r"node 'input_ids' has no 'podplan.role'"):
        verify(untagged)


def test_a_pass_that_skips_new_nodes_is_caught():
    """A node added without a stage, after classify, breaks 'every node has a stage'."""
    t, shape = traced("tiny-mixtral")
    gm = PassManager(["kv-cache", "annotate", "classify"]).run(t.gm, _ctx(shape))
    node = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.getitem)
    with gm.graph.inserting_after(node):
        extra = gm.graph.call_function(operator.neg, (node,))
    extra.meta.update({k: v for k, v in node.meta.items() if k not in (meta.STAGE, meta.STAGE_LAYER)})
    with pytest.raises(LintError, match=r"node 'neg' has no 'podplan.stage' while other nodes do"):
        verify(gm)
