"""Runs the staged program on an attention rank, one microbatch at a time, pausing at every routed-experts stage.

The program is the stage-split pipeline's output (`planner.frontend.stages`): its top-level graph
only calls stage modules (embed, layerN_attention, layerN_moe_gate, layerN_dense_ffn,
layerN_routed_experts, layerN_shared_experts, head) and unpacks their outputs. The interpreter
feeds it the graph inputs the kv-cache pass made (`past_key_values`: the microbatch's cache,
`past_len`: the positions already cached), runs every stage module the rank holds, and stops at
each routed-experts stage so the worker can send its operands to the expert ranks; `resume` hands
the combined rows back as that stage's output. With remote shared experts, the shared-experts
stage's input leaves with the dispatch and its output comes back with the combine.

Errors name rank, step and the node inside the stage module that failed.
"""

from __future__ import annotations

import linecache
import time
import traceback
from dataclasses import dataclass

import torch
import torch.fx as fx

from planner.frontend.stages import (PAST_KEY_VALUES, PAST_LEN, KVCache, StagedProgram, StageKey, routed_operands,
                                     single_input_stage, stage_calls)
from runtime.errors import SpecError, StageError
from runtime.kv import StaticKVCache

INPUT_IDS = "input_ids"
_INPUTS = (INPUT_IDS, PAST_LEN, PAST_KEY_VALUES)


@dataclass
class ExpertCall:
    """The operands of one routed-experts stage: rows [T, H], top-k ids and weights [T, k]."""

    layer: int
    hidden: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor
    shared_in: torch.Tensor | None  # [T, H] input of the shared-experts stage when it runs remotely


class StageEvents:
    """Time marks around stages of one profiled step: CUDA events on a GPU (read after the step), host
    clocks on a CPU. spans: (stage kind, stage name, start, end).

    On a GPU a stage timed with `run` is captured as a CUDA graph of its own and replayed between
    its two events: the time is its kernels', as in a replayed step. Timed eagerly, a stage of many
    small kernels would also count the host launching them (the GPU waits on it), which a replayed
    step never pays: an eager step's attention measured 48 ms where its kernels take 5."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.spans: list[tuple[str, str, object, object]] = []
        self.graphs: list[torch.cuda.CUDAGraph] = []  # kept until the events are read
        self._pool = torch.cuda.graph_pool_handle() if cuda else None
        self._stream = torch.cuda.Stream() if cuda else None

    def mark(self) -> object:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def add(self, kind: str, name: str, start: object) -> None:
        self.spans.append((kind, name, start, self.mark()))

    def run(self, kind: str, name: str, fn, *args: object):
        """fn(*args), timed: from a CUDA graph of its own on a GPU (captured, then replayed once: the
        same effects as one call), eagerly on a CPU."""
        if not self.cuda:
            start = self.mark()
            out = fn(*args)
            self.add(kind, name, start)
            return out
        graph = torch.cuda.CUDAGraph()
        side = self._stream
        assert side is not None
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # torch.cuda.graph() would also gc and empty the cache per stage
            graph.capture_begin(pool=self._pool)
            try:
                out = fn(*args)
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(side)
        start = self.mark()
        graph.replay()
        self.add(kind, name, start)
        self.graphs.append(graph)
        return out

    def ms_by_kind(self) -> dict[str, float]:
        """Milliseconds per stage kind (call once the device is idle)."""
        out: dict[str, float] = {}
        for kind, _, a, b in self.spans:
            ms = a.elapsed_time(b) if self.cuda else (b - a) * 1e3  # type: ignore[attr-defined,operator]
            out[kind] = out.get(kind, 0.0) + ms
        return {k: round(v, 4) for k, v in sorted(out.items())}


def call_stage(stage: fx.GraphModule, *args: object) -> tuple:
    """Run a stage module: its generated forward, called directly (GraphModule.__call__ prints the
    failing line to stderr and may drop the traceback, which `failing_node` reads)."""
    return stage.forward(*args)


def failing_node(stage: fx.GraphModule, exc: BaseException) -> str:
    """The node of `stage` whose line of generated code raised `exc`; '(call)' if it failed entering it.

    torch.fx generates one `name = ...` statement per node, so the innermost frame in the stage's
    code names the node, without running the stage node by node in Python."""
    code = stage.forward.__code__.co_filename
    lines = [ln for frame, ln in traceback.walk_tb(exc.__traceback__) if frame.f_code.co_filename == code]
    if not lines:
        return "(call)"
    statement = linecache.getline(code, lines[-1]).strip()
    name = statement.split(" = ", 1)[0] if " = " in statement else ""
    return name if name.isidentifier() else "(output)" if statement.startswith("return") else "(call)"


@dataclass
class RankProgram:
    """The staged program as an attention rank runs it: which top-level calls are which stages."""

    gm: fx.GraphModule
    keys: dict[fx.Node, StageKey]  # every stage call -> its stage
    experts: dict[fx.Node, int]  # routed-experts stage call -> layer
    operands: dict[int, tuple[int, int, int]]  # layer -> positions of (hidden, ids, weights) in its call
    shared: dict[int, fx.Node]  # layer -> shared-experts stage call
    modules: dict[str, fx.GraphModule]  # stage name -> its module (looked up on first use)

    @classmethod
    def of(cls, program: StagedProgram) -> RankProgram:
        inputs = [str(n.target) for n in program.gm.graph.nodes if n.op == "placeholder"]
        missing = [name for name in _INPUTS if name not in inputs]
        unknown = [name for name in inputs if name not in _INPUTS]
        if missing or unknown:
            raise SpecError(f"the staged program takes inputs {inputs}; the runtime feeds exactly {list(_INPUTS)} "
                            "(the 'kv-cache' pass makes the cache ones): keep that pass in the stage-split pipeline")
        keys: dict[fx.Node, StageKey] = {}
        experts: dict[fx.Node, int] = {}
        operands: dict[int, tuple[int, int, int]] = {}
        shared: dict[int, fx.Node] = {}
        for node, key in stage_calls(program):
            keys[node] = key
            if key.layer is None:
                continue
            if key.kind == "routed_experts":
                experts[node] = key.layer
                operands[key.layer] = routed_operands(program, key.name)
            elif key.kind == "shared_experts":
                shared[key.layer] = node
        return cls(program.gm, keys, experts, operands, shared, {})

    def module(self, name: str) -> fx.GraphModule:
        if name not in self.modules:
            stage = self.gm.get_submodule(name)
            assert isinstance(stage, fx.GraphModule), f"stage {name}: the pass manager's staged lint checks this"
            self.modules[name] = stage
        return self.modules[name]

    def check_remote_shared(self, program: StagedProgram, name: str) -> None:
        """Remote shared experts: each layer's shared stage takes one input, ready before its routed stage."""
        order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        routed = {layer: node for node, layer in self.experts.items()}
        for layer, call in self.shared.items():
            stage = self.keys[call].name
            if not single_input_stage(program, stage) or len(call.args) != 1 or not isinstance(call.args[0], fx.Node):
                raise SpecError(f"{name}: stage {stage} takes several inputs or gives several outputs; the runtime "
                                "sends one row per token to a shared-expert device: put the shared experts on the "
                                "attention devices")
            if layer not in routed or not order[call.args[0]] < order[routed[layer]] < order[call]:
                raise SpecError(f"{name}: stage {stage} does not run beside layer {layer}'s routed experts; put the "
                                "shared experts on the attention devices")


def _shared_input(snode: fx.Node) -> fx.Node:
    """The one value a remote shared-experts stage takes."""
    src = snode.args[0] if len(snode.args) == 1 else None
    if not isinstance(src, fx.Node):  # internal: check_remote_shared rejects this before any rank starts
        raise AssertionError(f"shared-experts stage {snode.target} takes {snode.args!r}, not one value")
    return src


def check_remote_shared(program: StagedProgram, name: str) -> None:
    """Before any process starts: the program's shared-experts stages can run on other devices."""
    RankProgram.of(program).check_remote_shared(program, name)


class RankInterpreter(fx.Interpreter):
    """One microbatch of one attention rank: `begin`, then `advance` / `resume` until logits come out."""

    def __init__(self, program: RankProgram, *, rank: int, kv: KVCache | StaticKVCache, remote_shared: bool,
                 clock: dict[str, float], stage_clock: dict[str, float] | None = None):
        super().__init__(program.gm, garbage_collect_values=True)
        self.program, self.rank, self.kv, self.remote_shared = program, rank, kv, remote_shared
        self.clock = clock  # seconds per stage kind (the metrics table's columns)
        self.stage_clock = stage_clock if stage_clock is not None else {}  # seconds per stage module
        self.stage = "setup"
        self.past = 0  # positions in the cache
        self.position: torch.Tensor | None = None  # static buffers: `past` as a device tensor (fed as past_len)
        self.events: StageEvents | None = None  # set for a profiled step
        self._inputs: dict[str, object] = {}
        self._shared_out: dict[fx.Node, tuple[torch.Tensor]] = {}
        self._pending: fx.Node | None = None

    def begin(self, input_ids: torch.Tensor, stage: str) -> None:
        """Start a step on input_ids [b, S] that follow the `past` cached positions."""
        self.env = {}
        past = self.past if self.position is None else self.position
        self._inputs = {INPUT_IDS: input_ids, PAST_LEN: past, PAST_KEY_VALUES: self.kv}
        self._nodes = iter(self.graph.nodes)
        self._seq = input_ids.shape[1]
        self.stage = stage

    def advance(self) -> ExpertCall | torch.Tensor:
        """Run the program up to the next routed-experts stage (its operands) or the output (the logits)."""
        for node in self._nodes:
            layer = self.program.experts.get(node)
            if layer is not None:
                return self._pause(node, layer)
            self._store(node, self._run(node))
            if node.op == "output":
                self.past += self._seq
                return self.env[node]
        raise AssertionError("advance() after the output node")  # internal: the worker's loop is wrong

    @property
    def paused_at(self) -> fx.Node:
        """The routed-experts stage call the last `advance` stopped at."""
        if self._pending is None:  # internal: the worker's loop is wrong
            raise AssertionError("the interpreter is not paused at a routed-experts stage")
        return self._pending

    def resume(self, routed: torch.Tensor, shared: torch.Tensor | None) -> None:
        """The routed-experts stage's output (and the remote shared experts' one) from the exchange."""
        node, self._pending = self.paused_at, None
        if shared is not None:
            snode = self.program.shared[self.program.experts[node]]
            like = self.env[_shared_input(snode)]
            self._shared_out[snode] = (shared.view(like.shape),)
        self._store(node, (routed,))  # stages return tuples

    def _pause(self, node: fx.Node, layer: int) -> ExpertCall:
        self._pending = node
        args = self.fetch_args_kwargs_from_env(node)[0]
        h, i, w = self.program.operands[layer]
        shared_in = None
        snode = self.program.shared.get(layer)
        if self.remote_shared and snode is not None:
            src = self.env[_shared_input(snode)]
            shared_in = src.reshape(-1, src.shape[-1])
        return ExpertCall(layer, args[h], args[i], args[w], shared_in)

    def _store(self, node: fx.Node, value: object) -> None:
        self.env[node] = value
        for dead in self.user_to_last_uses.get(node, []):
            self.env.pop(dead, None)

    def _run(self, node: fx.Node) -> object:
        if node.op == "placeholder":
            return self._inputs[str(node.target)]  # RankProgram.of checked the names
        if node.op != "call_module":
            return self.run_node(node)  # the getitems that unpack stage outputs, and the output
        if node in self._shared_out:
            return self._shared_out.pop(node)
        key = self.program.keys[node]
        stage = self.program.module(key.name)
        args = self.fetch_args_kwargs_from_env(node)[0]
        t0 = time.perf_counter()
        try:
            if self.events is not None:
                value = self.events.run(key.kind, key.name, call_stage, stage, *args)
            else:
                value = call_stage(stage, *args)
        except Exception as exc:  # noqa: BLE001 - any failure inside the model is reported with its node
            raise StageError(self.rank, self.stage, f"{failing_node(stage, exc)} in {key.name}",
                             f"{type(exc).__name__}: {exc}") from exc
        dt = time.perf_counter() - t0
        self.clock[key.kind] = self.clock.get(key.kind, 0.0) + dt
        self.stage_clock[key.name] = self.stage_clock.get(key.name, 0.0) + dt
        return value
