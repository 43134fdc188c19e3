"""Runs the traced model on an attention rank, one microbatch at a time, pausing at every MoE layer.

The graph is the frontend's leaf-module trace. The interpreter feeds it the rank's KV cache and
positions, and stops at each routed-experts node so the worker can dispatch the tokens to the
expert ranks; `resume` hands the combined result back. Errors name rank, stage and fx node.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.fx as fx

from planner.frontend.trace import Traced, podplan_causal_mask
from runtime.errors import SpecError, StageError
from runtime.kv import KVStore


@dataclass
class ExpertCall:
    """The operands of one routed-experts node: rows [T, H], top-k ids and weights [T, k]."""

    layer: int
    hidden: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor
    shared_in: torch.Tensor | None  # [T, H] input of the shared experts when they run remotely


@dataclass(frozen=True)
class GraphMap:
    """Where the interpreter intervenes: per-layer experts / shared nodes, positions, masks, roles."""

    experts: dict[fx.Node, int]  # routed-experts node -> layer
    shared: dict[int, list[fx.Node]]  # layer -> shared-expert nodes
    positions: fx.Node
    roles: dict[fx.Node, str]

    @classmethod
    def of(cls, traced: Traced) -> GraphMap:
        roles: dict[fx.Node, str] = {}
        experts: dict[fx.Node, int] = {}
        shared: dict[int, list[fx.Node]] = {}
        positions = None
        for node in traced.gm.graph.nodes:
            role, layer = traced.roles.leaves.get(str(node.target), ("other", None)) if node.op == "call_module" \
                else ("other", None)
            roles[node] = role
            if role == "routed_experts":
                experts[node] = _expert_layer(node, layer)
            elif role == "shared_experts":
                shared.setdefault(_expert_layer(node, layer), []).append(node)
            elif role == "attention" and positions is None:
                positions = node.kwargs.get("position_ids")
        if not isinstance(positions, fx.Node):
            raise SpecError(f"{traced.source.name}: the traced attention takes no position_ids node; the runtime "
                            "needs it to run a KV cache (an unsupported family)")
        return cls(experts, shared, positions, roles)

    def check_remote_shared(self, name: str) -> None:
        """Remote shared experts need one shared module per layer, fed before and used after the experts node."""
        order = {n: i for i, n in enumerate(next(iter(self.experts)).graph.nodes)}
        for node, layer in self.experts.items():
            nodes = self.shared.get(layer, [])
            if not nodes:
                continue
            if len(nodes) != 1 or len(nodes[0].args) != 1 or not isinstance(nodes[0].args[0], fx.Node):
                raise SpecError(f"{name}: layer {layer} has {len(nodes)} shared-expert modules with other inputs; "
                                "the runtime computes them remotely only for one MLP: put them on the attention devices")
            src = nodes[0].args[0]
            if not order[src] < order[node] < order[nodes[0]]:
                raise SpecError(f"{name}: layer {layer} runs its shared experts before the routed ones; put the "
                                "shared experts on the attention devices")


def _expert_layer(node: fx.Node, layer: int | None) -> int:
    if layer is None:  # internal: planner.frontend.roles files every expert module under its decoder layer
        raise AssertionError(f"experts module {node.target} has no layer")
    return layer


def _shared_input(snode: fx.Node) -> fx.Node:
    """The one node feeding a remote shared-experts module."""
    src = snode.args[0]
    if not isinstance(src, fx.Node):  # internal: GraphMap.check_remote_shared rejects this before any rank starts
        raise AssertionError(f"shared experts {snode.name} take {src!r}, not a node")
    return src


class StageInterpreter(fx.Interpreter):
    """One microbatch of one attention rank: `begin`, then `advance` / `resume` until logits come out."""

    def __init__(self, traced: Traced, gmap: GraphMap, *, rank: int, kv: KVStore, remote_shared: bool,
                 clock: dict[str, float]):
        super().__init__(traced.gm, garbage_collect_values=True)
        self.gmap, self.rank, self.kv, self.remote_shared, self.clock = gmap, rank, kv, remote_shared, clock
        self.stage = "setup"
        self.past = 0
        self._shared_out: dict[fx.Node, torch.Tensor] = {}
        self._pending: fx.Node | None = None

    def begin(self, input_ids: torch.Tensor, stage: str) -> None:
        """Start a step on input_ids [b, S] that follow the `past` cached positions."""
        self.env = {}
        self.args_iter = iter([input_ids])
        self._nodes = iter(self.graph.nodes)
        self._seq = input_ids.shape[1]
        self.stage = stage

    def advance(self) -> ExpertCall | torch.Tensor:
        """Run nodes up to the next routed-experts node (its operands) or the output (the logits)."""
        for node in self._nodes:
            layer = self.gmap.experts.get(node)
            if layer is not None:
                return self._pause(node, layer)
            self._store(node, self._run(node))
            if node.op == "output":
                self.past += self._seq
                return self.env[node]
        raise AssertionError("advance() after the output node")  # internal: the worker's loop is wrong

    @property
    def paused_at(self) -> fx.Node:
        """The routed-experts node the last `advance` stopped at."""
        if self._pending is None:  # internal: the worker's loop is wrong
            raise AssertionError("the interpreter is not paused at an experts node")
        return self._pending

    def resume(self, routed: torch.Tensor, shared: torch.Tensor | None) -> None:
        """The experts node's value (and the remote shared experts' output) from the exchange."""
        node, self._pending = self.paused_at, None
        if shared is not None:
            (snode,) = self.gmap.shared[self.gmap.experts[node]]
            self._shared_out[snode] = shared.view(self.env[_shared_input(snode)].shape)
        self._store(node, routed)

    def _pause(self, node: fx.Node, layer: int) -> ExpertCall:
        self._pending = node
        hidden, ids, weights = self.fetch_args_kwargs_from_env(node)[0]
        shared_in = None
        if self.remote_shared and self.gmap.shared.get(layer):
            src = _shared_input(self.gmap.shared[layer][0])
            shared_in = self.env[src].reshape(-1, self.env[src].shape[-1])
        return ExpertCall(layer, hidden, ids, weights, shared_in)

    def _store(self, node: fx.Node, value: object) -> None:
        self.env[node] = value
        for dead in self.user_to_last_uses.get(node, []):
            self.env.pop(dead, None)

    def _run(self, node: fx.Node) -> object:
        role = self.gmap.roles[node]
        t0 = time.perf_counter()
        try:
            if node is self.gmap.positions:
                dev = self.kv_device()
                value = torch.arange(self.past, self.past + self._seq, device=dev)[None, :]
            elif node in self._shared_out:
                value = self._shared_out.pop(node)
            else:
                value = self.run_node(node)
        except StageError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure inside the model is reported with its node
            raise StageError(self.rank, self.stage, node.name, f"{type(exc).__name__}: {exc}") from exc
        self.clock[role] = self.clock.get(role, 0.0) + time.perf_counter() - t0
        return value

    def kv_device(self) -> torch.device:
        return next(self.module.parameters()).device

    def call_function(self, target, args, kwargs):
        if target is podplan_causal_mask:
            like, positions, window = args[:3]
            return podplan_causal_mask(like, positions, int(window or 0), self.past)
        return super().call_function(target, args, kwargs)

    def call_module(self, target, args, kwargs):
        if self.gmap.roles.get(self._current) == "attention":
            kwargs = dict(kwargs, past_key_values=self.kv, use_cache=True)
        return super().call_module(target, args, kwargs)

    def run_node(self, n: fx.Node):
        self._current = n
        return super().run_node(n)
