"""split: one submodule per stage; the top-level graph only calls stages and unpacks their outputs.

Built on `torch.fx.passes.split_module` (node names and metadata are kept inside the stages; every
stage returns a tuple). Stage submodules are named after their `StageKey` ('embed',
'layer3_attention', 'head'); the top-level call node of a stage carries the stage's total cost.
"""

from __future__ import annotations

import inspect
import operator

import torch.fx as fx
from torch.fx.passes.split_module import split_module

from passes import meta
from passes.context import PassContext
from passes.graphs import program_order, stage_module

NAME = "split"
NEEDS = (meta.STAGE, meta.STAGE_LAYER, meta.COST)
PROVIDES = (meta.STAGED,)

_PREFIX = "submod_"
# The role a stage's call node carries at the top level: its defining leaf's role.
_STAGE_ROLE = {"embed": "embed", "head": "lm_head"}
_NO_COST = meta.NodeCost(0, 0, 0.0, 0.0, (), "")


def _stage_cost(stage: fx.GraphModule) -> meta.NodeCost:
    """Sum of the stage's node costs; output shapes are the stage's outputs."""
    inner = [n for n in stage.graph.nodes if n.op not in ("placeholder", "output")]
    outputs = [a for a in stage.graph.output_node().all_input_nodes]
    costs = [meta.cost_of(n) for n in inner]
    out_costs = [meta.cost_of(n) for n in outputs]
    return meta.NodeCost(
        params=sum(c.params for c in costs),
        weight_bytes=sum(c.weight_bytes for c in costs),
        flops_per_token=float(sum(c.flops_per_token for c in costs)),
        act_bytes_per_token=float(sum(c.act_bytes_per_token for c in costs)),
        out_shapes=tuple(s for c in out_costs for s in c.out_shapes),
        out_dtype=out_costs[0].out_dtype if out_costs else "",
    )


def _set_stage_meta(node: fx.Node, key: meta.StageKey, role: str, cost: meta.NodeCost) -> None:
    node.meta[meta.ROLE] = role
    node.meta[meta.LAYER] = key.layer
    node.meta[meta.MODULE] = key.name
    node.meta[meta.STAGE] = key.kind
    node.meta[meta.STAGE_LAYER] = key.layer
    node.meta[meta.COST] = cost


def _grouped_by_stage(gm: fx.GraphModule, num_layers: int) -> fx.GraphModule:
    """A copy whose nodes run stage by stage in program order (a valid order: classify checked every
    edge goes forward), so split_module emits the stage calls in program order."""
    nodes = list(gm.graph.nodes)
    rank = {n: (program_order(meta.stage_key_of(n), num_layers), i) for i, n in enumerate(nodes)}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in sorted(nodes, key=rank.__getitem__):
        env[node] = graph.node_copy(node, env.__getitem__)
    return fx.GraphModule(gm, graph)


# split_module's tuple_return (torch >= 2.12) makes every stage return a tuple; older releases (the
# CUDA images of GPU hosts may carry one) return a one-output stage's value bare: `_tuple_returns`
# gives those stages the same form afterwards, so the staged program is the same on every torch.
_HAS_TUPLE_RETURN = "tuple_return" in inspect.signature(split_module).parameters


def _split_module(grouped: fx.GraphModule, stage_name) -> fx.GraphModule:
    kwargs = dict(keep_original_order=True, keep_original_node_name=True)
    if _HAS_TUPLE_RETURN:
        kwargs["tuple_return"] = True
    # torch's stub says the callback returns int, but split_module only formats the key into the
    # partition name (f"submod_{key}"), which is how stages get their names. (It compares keys as
    # ints only around autocast / set_grad_enabled regions, which traced inference graphs lack.)
    staged = split_module(grouped, grouped, stage_name, **kwargs)  # type: ignore[arg-type]
    if not _HAS_TUPLE_RETURN:
        _tuple_returns(staged)
    return staged


def _tuple_returns(staged: fx.GraphModule) -> None:
    """Make every stage return a tuple and read its one-output stages through getitem 0."""
    for node in list(staged.graph.nodes):
        if node.op != "call_module":
            continue
        stage = stage_module(staged, node)
        out = stage.graph.output_node()
        if isinstance(out.args[0], (tuple, list)):
            continue
        out.args = ((out.args[0],),)
        stage.recompile()
        with staged.graph.inserting_after(node):
            first = staged.graph.call_function(operator.getitem, (node, 0))
        node.replace_all_uses_with(first, delete_user_cb=lambda user: user is not first)
    staged.recompile()


def split(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Cut the classified graph into stage submodules wired by a top-level graph."""
    grouped = _grouped_by_stage(gm, ctx.shape.num_layers)
    keys = {n.name: meta.stage_key_of(n) for n in grouped.graph.nodes}

    def stage_name(node: fx.Node) -> str:
        return keys[node.name].name

    staged = _split_module(grouped, stage_name)
    by_name = {key.name: key for key in keys.values()}
    head = meta.StageKey(None, "head")
    for node in staged.graph.nodes:
        if node.op == "call_module":
            name = str(node.target)[len(_PREFIX):]
            stage = stage_module(staged, node)
            delattr(staged, str(node.target))
            staged.add_module(name, stage)
            node.target = name
            key = by_name[name]
            _set_stage_meta(stage.graph.output_node(), key, "other", _NO_COST)
            _set_stage_meta(node, key, _STAGE_ROLE.get(key.kind, key.kind), _stage_cost(stage))
        elif node.op == "call_function" and node.target is operator.getitem:
            producer, index = node.args
            assert isinstance(producer, fx.Node) and isinstance(index, int)
            outputs = stage_module(staged, producer).graph.output_node().args[0]
            assert isinstance(outputs, tuple), "tuple_return=True: every stage returns a tuple"
            value = outputs[index]
            assert isinstance(value, fx.Node), value
            cost = meta.cost_of(value)
            _set_stage_meta(node, meta.stage_key_of(producer), "other", meta.NodeCost(0, 0, 0.0, 0.0, cost.out_shapes, cost.out_dtype))
        elif node.op == "output":
            _set_stage_meta(node, head, "other", _NO_COST)
    staged.recompile()
    staged.meta = {k: v for k, v in gm.meta.items() if k in meta.GRAPH_KEYS}
    staged.meta[meta.STAGED] = True
    return staged
