"""The pass manager: runs a pipeline, checks each pass's needs, verifies the graph after every pass.

Verification (`verify`) is always on: torch's `Graph.lint()` plus podplan's invariants; a pass
that breaks them fails with a message naming it and the passes that ran before it.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch.fx as fx

from costmodels.errors import PodplanError
from passes import PASSES, get_pass, meta
from passes.errors import LintError, PassError
from passes.context import PassContext
from passes.graphs import stage_module

# Node keys set by the frontend's trace, not by a pass.
_FRONTEND_KEYS = (meta.ROLE, meta.LAYER, meta.MODULE)
# Node keys that, once a pass sets them, every node must carry.
_ALL_OR_NONE = (meta.COST, meta.STAGE, meta.STAGE_LAYER)


@dataclass(frozen=True)
class PassRecord:
    name: str
    seconds: float


def _providers(key: str) -> str:
    names = [p.name for p in PASSES.values() if key in p.provides]
    return " or ".join(f"'{n}'" for n in names) or "the frontend trace"


def _missing(gm: fx.GraphModule, key: str) -> str | None:
    """Where `key` is missing: 'the graph', a node's name, or None if present everywhere it belongs."""
    if key in meta.GRAPH_KEYS:
        return None if key in gm.meta else "the graph"
    node = next((n for n in gm.graph.nodes if key not in n.meta), None)
    return None if node is None else f"node '{node.name}'"


def check_needs(gm: fx.GraphModule, name: str, needs: Sequence[str]) -> None:
    """Fail if a key the pass needs is missing (graph keys on the graph, node keys on every node)."""
    for key in needs:
        where = _missing(gm, key)
        if where is None:
            continue
        scope = "the graph" if key in meta.GRAPH_KEYS else f"every node ({where} has none)"
        raise PassError(f"{name} needs '{key}' on {scope}; run {_providers(key)} first")


def _lint_torch(graph: fx.Graph, where: str) -> None:
    try:
        graph.lint()
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError/AssertionError; one line either way
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LintError(f"{where}: torch.fx lint failed: {first}") from exc


def _lint_nodes(graph: fx.Graph, where: str) -> None:
    nodes = list(graph.nodes)
    for key in _FRONTEND_KEYS[:2]:
        bad = next((n for n in nodes if key not in n.meta), None)
        if bad is not None:
            raise LintError(f"{where}: node '{bad.name}' has no '{key}'; every node needs a role and a layer (tag nodes a pass creates)")
    for key in _ALL_OR_NONE:
        have = [key in n.meta for n in nodes]
        if any(have) and not all(have):
            bad = nodes[have.index(False)]
            raise LintError(f"{where}: node '{bad.name}' has no '{key}' while other nodes do; the pass that created it must set it")
    bad = next((n for n in nodes if meta.STAGE in n.meta and meta.stage_of(n) not in meta.STAGE_KINDS), None)
    if bad is not None:
        raise LintError(f"{where}: node '{bad.name}' has stage kind '{meta.stage_of(bad)}'; kinds are {', '.join(meta.STAGE_KINDS)}")


def _lint_staged(gm: fx.GraphModule, where: str) -> None:
    """The top level only calls stages and unpacks their outputs; each stage holds only its own nodes."""
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op == "call_function" and node.target is operator.getitem and getattr(node.args[0], "op", "") == "call_module":
            continue
        if node.op != "call_module":
            raise LintError(
                f"{where}: top-level node '{node.name}' ({node.op} {getattr(node.target, '__name__', node.target)}) "
                "computes outside any stage; a staged program's top level only calls stages (move it into one)"
            )
        key = meta.stage_key_of(node)
        if node.target != key.name:
            raise LintError(f"{where}: stage call '{node.name}' targets '{node.target}' but is tagged stage {key.name}")
        stage = gm.get_submodule(str(node.target))
        if not isinstance(stage, fx.GraphModule):
            raise LintError(f"{where}: stage '{node.target}' is a {type(stage).__name__}, not a GraphModule")
        _lint_torch(stage.graph, f"{where}: stage {key.name}")
        _lint_nodes(stage.graph, f"{where}: stage {key.name}")
        for inner in stage.graph.nodes:
            if inner.op in ("placeholder", "output"):
                continue  # boundary nodes: placeholders carry their producer's metadata
            if meta.stage_key_of(inner) != key:
                raise LintError(
                    f"{where}: node '{inner.name}' inside stage {key.name} is classified {meta.stage_key_of(inner).name}; "
                    "stage boundaries must be explicit (re-run classify and split)"
                )


def verify(gm: fx.GraphModule, where: str = "graph") -> None:
    """Raise LintError if `gm` breaks torch's lint or podplan's invariants."""
    _lint_torch(gm.graph, where)
    _lint_nodes(gm.graph, where)
    if gm.meta.get(meta.STAGED):
        _lint_staged(gm, where)


def format_graph(gm: fx.GraphModule, title: str = "") -> str:
    """The graph as text, one node a line with its podplan metadata; a staged program prints each stage."""
    lines = [f"// {title}"] if title else []
    lines += _format_nodes(gm.graph, "")
    if gm.meta.get(meta.STAGED):
        for node in gm.graph.nodes:
            if node.op == "call_module":
                lines.append(f"\nstage {node.target}:")
                lines += _format_nodes(stage_module(gm, node).graph, "  ", in_stage=True)
    return "\n".join(lines)


def _format_nodes(graph: fx.Graph, indent: str, in_stage: bool = False) -> list[str]:
    out = []
    for node in graph.nodes:
        tags = [f"role={node.meta.get(meta.ROLE, '?')}", f"layer={node.meta.get(meta.LAYER, '-')}"]
        if meta.STAGE in node.meta:
            # a stage's placeholders carry their producer's metadata: show where the value comes from
            label = "from" if in_stage and node.op == "placeholder" else "stage"
            tags.append(f"{label}={meta.stage_key_of(node).name}")
        if meta.COST in node.meta and node.meta[meta.COST].out_shapes:
            tags.append("shape=" + ",".join("x".join(map(str, s)) for s in node.meta[meta.COST].out_shapes))
        out.append(f"{indent}{node.format_node()}  {{{' '.join(tags)}}}")
    return out


class PassManager:
    """Runs passes by name: needs check, the pass, provides check, verification, timing, optional dump."""

    def __init__(self, names: Sequence[str], *, dump_after: str | None = None, dump: Callable[[str], None] = print):
        self.passes = [get_pass(n) for n in names]
        if dump_after is not None:
            get_pass(dump_after)
            if dump_after not in names:
                raise PassError(f"--dump-after '{dump_after}': not in this pipeline ({', '.join(names)})")
        self.dump_after = dump_after
        self.dump = dump
        self.records: list[PassRecord] = []

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        verify(gm, "input graph")
        done: list[str] = []
        for info in self.passes:
            check_needs(gm, info.name, info.needs)
            start = time.perf_counter()
            try:
                result = info.run(gm, ctx)
            except Exception as exc:  # noqa: BLE001 - any failure is reported with the pass that raised it
                after = f" (after {', '.join(done)})" if done else " (first pass)"
                message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                if not isinstance(exc, PodplanError):
                    message = f"{type(exc).__name__}: {message}"
                raise PassError(f"pass '{info.name}'{after} failed: {message}") from exc
            self.records.append(PassRecord(info.name, time.perf_counter() - start))
            if result is gm:
                raise PassError(f"pass '{info.name}' returned its input graph; passes must build a new GraphModule")
            for key in info.provides:
                if _missing(result, key) is not None:
                    raise PassError(f"pass '{info.name}' declares it provides '{key}' but {_missing(result, key)} lacks it")
            verify(result, f"after pass '{info.name}'")
            done.append(info.name)
            gm = result
            if info.name == self.dump_after:
                self.dump(format_graph(gm, f"after pass '{info.name}'"))
        return gm
