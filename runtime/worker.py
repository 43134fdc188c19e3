"""One rank of a run: `python -m runtime.worker JOB.json` under the launcher or under torchrun.

Reads RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT (and LOCAL_RANK) from the environment and the
staged program from program.json beside the job (compiled once by whoever wrote the job), builds
the rank's modules, runs its instance's steps, and sends tokens, logits and metrics to rank 0,
which writes result.pt beside the job file. A failure writes rank<R>.error.json and exits 1.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from planner.frontend.program_io import PROGRAM_FILE, read_program
from planner.frontend.stages import new_kv_cache
from runtime.errors import SpecError, StageError
from runtime.exchange import Exchange
from runtime.interpreter import ExpertCall, RankInterpreter, StageEvents
from runtime.kv import StaticKVCache, kv_from_rows, kv_rows, pack, payload_numel, unpack
from runtime.lower import lower_masks
from runtime.parts import RankParts, build_parts, remote_shared
from runtime.routing import POS_STRIDE, token_keys
from runtime.schedule import WORLD, Op, programs
from runtime.spec import (InstanceSpec, RunSpec, kv_routes, microbatches_of, prompts_of, sequences_of,
                          steps_of)

# Test-only fault injection: "RANK:STEP:ACTION" fires at the first MoE layer of STEP on RANK;
# ACTION is raise (an exception), kill (SIGKILL itself) or hang (sleep, as a stuck rank would).
FAULT_ENV = "PODPLAN_FAULT"
# Bench-only kernel profile: "DIR[:eager]" profiles (torch.profiler) three replays of the captured
# decode step (or, with ":eager", three eager decode steps) after the timed run, on a GPU, and
# writes DIR/kernels-rank<R>.txt (kernels by total time) and a Chrome trace; the run's results are
# unchanged (it happens after the timed steps, on buffers nothing reads again).
KERNEL_PROFILE_ENV = "PODPLAN_KERNEL_PROFILE"
# Collectives give up after this long (a peer that vanished without closing its sockets).
COLLECTIVE_TIMEOUT_S = 120


@dataclass
class MicroBatch:
    """A slice of an attention rank's sequences with its own interpreter of the staged program (which
    holds its KV cache).

    A rank's microbatches are a list with one entry per microbatch index of its instance, None where
    the rank sends no rows (an expert-only rank, or fewer sequences than microbatches): every member
    still takes part in that index's exchanges.
    """

    seqs: list[int]
    interp: RankInterpreter
    next_input: torch.Tensor  # [b, S] token ids of the next step
    # static buffers (spec.static): prompt ids [b], tokens [b, steps] and last-position logits per step
    seq_ids: torch.Tensor | None = None
    history: torch.Tensor | None = None
    logits: dict[int, torch.Tensor] = field(default_factory=dict)
    last: torch.Tensor | None = None  # [b, V] float logits of the last step (a graph's output buffer)


class RankWorker:
    """Runs one rank's part of the spec; every communication is checked against the dry-run program."""

    def __init__(self, spec: RunSpec, rank: int, device: torch.device, program_doc: dict):
        self.spec, self.rank, self.device = spec, rank, device
        self.program_doc = program_doc  # the run's staged program (program.json), bound to the rank's model
        self.inst: InstanceSpec | None = next((i for i in spec.instances if rank in i.ranks), None)
        self.stage, self.node = "setup", "build"
        self.in_comm = False
        self.metrics: dict = {"rank": rank, "instance": self.inst.name if self.inst else None,
                              "role": self._role(), "clock": {}, "stage_clock": {}, "bytes_sent": 0,
                              "expert_rows": 0, "tokens": 0, "steps": {}}
        # seq -> step -> (token, last-position logits [V] when the spec keeps them)
        self.results: dict[int, dict[int, tuple[int, torch.Tensor | None]]] = {}
        self.collected: list[dict[str, Any]] = []  # rank 0, after gather: every rank's payload, by rank
        self.fault = _parse_fault(os.environ.get(FAULT_ENV), rank)
        self.capacity = spec.prompt_len + spec.new_tokens  # positions of a static KV cache
        # CUDA graphs: decode steps from GRAPH_FROM on replay one captured step (steps 1.. run eagerly
        # first: kernels pick their algorithms and the allocator settles; step PROFILE_STEP is timed per stage)
        self.graphs = spec.static and device.type == "cuda" and self.fault is None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_ops = 0  # communication operations one captured step issues
        self.graph_bytes = 0  # bytes one captured step sends to other ranks
        self.timer = _Timer(device)

    def _role(self) -> str:
        if self.inst is None:
            return "idle"
        a, e = self.rank in self.inst.attention_ranks, self.rank in self.inst.expert_ranks
        return "both" if a and e else "attention" if a else "experts" if e else "shared"

    # --- setup ----------------------------------------------------------------------------------

    def setup(self) -> None:
        t0 = time.perf_counter()
        self.moe_layers = [lp.layer for lp in self.spec.instances[0].layers]  # validated against the model
        self.program = programs(self.spec, self.moe_layers)[self.rank]
        self.pc = 0
        self.metrics["params"] = 0
        inst = self.inst
        if inst is not None:  # an idle rank builds nothing
            self.parts: RankParts = build_parts(self.spec, inst, self.rank, self.device, self.program_doc)
            self.metrics["params"] = self.parts.params
            if self.parts.moe_layers != self.moe_layers:
                raise SpecError(f"the staged program routes experts at layers {self.parts.moe_layers}, the spec "
                                f"places them at {self.moe_layers}")
            if self.spec.static and self.parts.program is not None:
                lower_masks(self.parts.program.gm, self.capacity)
        # every rank creates every group, in spec order (new_group is collective over the world)
        self.groups = {i.name: dist.new_group(list(i.ranks)) for i in self.spec.instances}
        if inst is not None:
            p = self.parts
            self.exchange = Exchange(
                inst, self.rank, self.groups[inst.name], num_experts=p.num_experts, hidden=p.hidden,
                dtype=p.dtype, device=self.device, experts=p.experts, shared=p.shared,
                remote_shared=remote_shared(inst, self.rank), metrics=self.metrics,
                capacity_factor=self.spec.capacity_factor)
            self.exchange.expect = lambda key: self.expect(key, group=inst.name)
            self.exchange.where = lambda: self.stage
        self.metrics["setup_s"] = time.perf_counter() - t0

    def expect(self, key: str, kind: str = "coll", peer: int = -1, group: str = "") -> None:
        """Check the next communication against the program the dry run replayed (group: a collective's)."""
        got = Op(kind, key, group=group, peer=peer)
        want = self.program[self.pc] if self.pc < len(self.program) else None
        if got != want:
            raise AssertionError(f"rank {self.rank} issues {got} but its dry-run program says {want}")
        self.pc += 1

    # --- the run --------------------------------------------------------------------------------

    def run(self) -> None:
        self.stage, self.node = "start", "barrier"
        self.in_comm = True
        dist.barrier()
        self.in_comm = False
        t0 = time.perf_counter()
        if self.inst is not None:
            self.run_instance(self.inst)
        self.metrics["run_s"] = time.perf_counter() - t0
        self.gather()

    def run_instance(self, inst: InstanceSpec) -> None:
        attention = self.rank in inst.attention_ranks
        mbs = self._microbatches(inst, attention)
        if inst.phases == ("decode",) and attention:
            self.receive_kv(mbs)
        self.rows = {phase: _max_rows(self.spec, inst, phase) for phase in ("prefill", "decode")}
        if self.graphs and "prefill" in inst.phases:
            self._warm_up(mbs)
        for step in steps_of(self.spec, inst):
            name = "prefill" if step == 0 else "decode"
            if self.spec.static:
                for mb in mbs:
                    if mb is not None and mb.interp.position is not None:
                        mb.interp.position.fill_(mb.interp.past)  # outside any graph: a replay reads it
            graphed = self.graphs and step >= GRAPH_FROM
            self.timer.start(name, graphed)
            if graphed:
                self._graph_step(step, mbs)
            else:
                self._profiled(step, mbs) if self.spec.static and step == PROFILE_STEP else self.run_step(step, mbs)
            self.timer.stop()
            if self.spec.static:
                self._record(step, mbs)
        self.timer.finish(self.metrics)
        if os.environ.get(KERNEL_PROFILE_ENV) and self.device.type == "cuda":
            self._kernel_profile(mbs, os.environ[KERNEL_PROFILE_ENV])
        if self.spec.static:
            self._collect(mbs)
        overflow = int(self.exchange.overflow)
        if overflow:
            raise StageError(self.rank, "exchange", "dispatch", f"{overflow} (token, expert) assignments did not fit "
                             "the fixed-capacity dispatch blocks; raise --capacity-factor (or leave it unset: the "
                             "worst case, which never overflows)")
        if inst.phases == ("prefill",) and attention:
            self.send_kv(mbs)

    def _microbatches(self, inst: InstanceSpec, attention: bool) -> list[MicroBatch | None]:
        """The rank's microbatches of its first phase, one per index of the instance (see MicroBatch)."""
        first = "prefill" if "prefill" in inst.phases else "decode"
        seqs = sequences_of(self.spec, first).get(self.rank, []) if attention else []
        chunks = microbatches_of(seqs, inst.microbatches)
        if not attention:
            return [None] * len(chunks)
        prompts = prompts_of(self.spec, self.parts.vocab).to(self.device)
        shared = remote_shared(inst, self.rank)
        out: list[MicroBatch | None] = []
        for s in chunks:
            if not s:
                out.append(None)
                continue
            position = torch.zeros((), dtype=torch.int64, device=self.device)
            kv = StaticKVCache(self.capacity, position) if self.spec.static else new_kv_cache()
            interp = self.parts.interpreter(rank=self.rank, kv=kv, remote_shared=shared, clock=self.metrics["clock"],
                                            stage_clock=self.metrics["stage_clock"])
            mb = MicroBatch(s, interp, prompts[s])
            if self.spec.static:
                interp.position = position
                mb.seq_ids = torch.tensor(s, dtype=torch.int64, device=self.device)
                mb.history = torch.full((len(s), self.spec.new_tokens), -1, dtype=torch.int64, device=self.device)
            out.append(mb)
        return out

    def run_step(self, step: int, mbs: list[MicroBatch | None]) -> None:
        label = "prefill" if step == 0 else f"decode step {step}"
        with torch.no_grad():
            # the step's tokens sit at positions past .. past + S - 1: one route per microbatch and step
            routes = [self.exchange.route(self._keys(mb)) if mb is not None else None for mb in mbs]
            rows = self.rows["prefill" if step == 0 else "decode"] * (self.spec.prompt_len if step == 0 else 1)
            for mb in mbs:
                if mb is not None:
                    mb.interp.begin(mb.next_input, label)
            for li, layer in enumerate(self.moe_layers):
                self.stage = f"{label} layer {layer}"
                pending = []
                for i, (mb, route) in enumerate(zip(mbs, routes)):
                    outgoing = (self._advance(mb, layer), route) if mb is not None and route is not None else None
                    if li == 0 and self.fault and self.fault[0] == step:
                        self._fire(self.fault[1], str(mb.interp.paused_at.target) if mb is not None else "expert slots")
                    pending.append(self._comm("dispatch", self.exchange.dispatch, step, i, layer, outgoing, rows,
                                              self.parts.top_k))
                combining = []
                for i, p in enumerate(pending):
                    combining.append(self._comm("experts", self.exchange.compute, step, i, p))
                for mb, c in zip(mbs, combining):
                    out = self._comm("combine", self.exchange.finish, c)
                    if mb is not None:
                        mb.interp.resume(*out)
            self.stage = f"{label} head"
            for mb in mbs:
                if mb is not None:
                    self._sample(step, mb)

    def _keys(self, mb: MicroBatch) -> torch.Tensor:
        """The step's token keys (`runtime.routing.token_keys`); from the device position with static buffers."""
        S = mb.next_input.shape[1]
        if mb.interp.position is None or mb.seq_ids is None:
            return token_keys(mb.seqs, mb.interp.past, S)
        pos = mb.interp.position + torch.arange(S, device=self.device)
        return (mb.seq_ids[:, None] * POS_STRIDE + pos[None, :]).reshape(-1)

    # --- static buffers and CUDA graphs ---------------------------------------------------------

    def _graph_step(self, step: int, mbs: list[MicroBatch | None]) -> None:
        """Capture the decode step once (the first time here), then replay it for every later step."""
        if self.graph is None:
            pasts = [mb.interp.past if mb is not None else 0 for mb in mbs]
            saved, pc = self._counters(), self.pc
            graph = torch.cuda.CUDAGraph()
            torch.cuda.synchronize(self.device)
            # no stage events inside the graph: timed event nodes crashed the process on torch 2.11 +
            # CUDA 13 (SIGSEGV), so stage times come from the profiled step (a CUDA graph per stage)
            with torch.cuda.graph(graph):
                self.run_step(step, mbs)
            # capturing ran no kernel: undo the host-side effects, the replays redo them
            for mb, past in zip(mbs, pasts):
                if mb is not None:
                    mb.interp.past = past
            self.graph_ops, self.graph_bytes = self.pc - pc, self.metrics["bytes_sent"] - saved["bytes_sent"]
            self.pc = pc
            self._restore_counters(saved)
            self.graph = graph
        self._replayed_ops(step)
        self.graph.replay()
        for mb in mbs:
            if mb is not None:
                mb.interp.past += mb.next_input.shape[1]
                self.metrics["tokens"] += len(mb.seqs)
        self.metrics["bytes_sent"] += self.graph_bytes

    def _kernel_profile(self, mbs: list[MicroBatch | None], where: str) -> None:
        from torch.profiler import ProfilerActivity, profile

        out, _, mode = where.partition(":")
        eager = mode == "eager" or self.graph is None
        saved, pasts = self._counters(), [mb.interp.past if mb is not None else 0 for mb in mbs]
        check, self.expect = self.expect, lambda *args, **kwargs: None  # type: ignore[method-assign]
        torch.cuda.synchronize(self.device)
        try:
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    if eager:
                        self.run_step(PROFILE_STEP, mbs)
                    else:
                        self.graph.replay()  # type: ignore[union-attr]
                torch.cuda.synchronize(self.device)
        finally:
            self.expect = check  # type: ignore[method-assign]
            self._restore_counters(saved)
            for mb, past in zip(mbs, pasts):
                if mb is not None:
                    mb.interp.past = past
        Path(out).mkdir(parents=True, exist_ok=True)
        tag = f"{'eager' if eager else 'graph'}-rank{self.rank}"
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=60, max_name_column_width=90)
        kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
        Path(out, f"kernels-{tag}.txt").write_text(f"{kernels} device events in 3 steps\n{table}\n")
        prof.export_chrome_trace(str(Path(out, f"trace-{tag}.json")))

    def _counters(self) -> dict:
        """The metrics a step adds to, to be restored after work that must not count (capture, warm-up)."""
        out: dict = {k: self.metrics[k] for k in ("tokens", "bytes_sent", "expert_rows")}
        out.update({k: dict(self.metrics[k]) for k in ("clock", "stage_clock")})
        return out

    def _restore_counters(self, saved: dict) -> None:
        for k, v in saved.items():
            if isinstance(v, dict):  # in place: the interpreters hold these dicts
                self.metrics[k].clear()
                self.metrics[k].update(v)
            else:
                self.metrics[k] = v

    def _warm_up(self, mbs: list[MicroBatch | None]) -> None:
        """One untimed prefill before the timed one, on a GPU: the first kernels of a process pay for
        the CUDA context, cuBLAS and module loading (as generate's warm-up run does). Every member of the
        instance runs it, so its collectives pair up; the dry-run program does not list them. The real
        prefill then rewrites the same cache positions."""
        saved = self._counters()
        inputs = [mb.next_input if mb is not None else None for mb in mbs]
        check, self.expect = self.expect, lambda *args, **kwargs: None  # type: ignore[method-assign]
        try:
            self.run_step(0, mbs)
        finally:
            self.expect = check  # type: ignore[method-assign]
        for mb, ids in zip(mbs, inputs):
            if mb is not None and ids is not None:
                mb.next_input, mb.interp.past, mb.last = ids, 0, None
        self._restore_counters(saved)
        self.exchange.overflow.zero_()
        torch.cuda.synchronize(self.device)

    def _stage_events(self, mbs: list[MicroBatch | None], events: StageEvents | None) -> None:
        for mb in mbs:
            if mb is not None:
                mb.interp.events = events
        if self.inst is not None:
            self.exchange.events = events

    def _replayed_ops(self, step: int) -> None:
        """A replay issues the captured step's operations: check them against the dry-run program."""
        for _ in range(self.graph_ops):
            want = self.program[self.pc] if self.pc < len(self.program) else None
            if want is None or not want.key.startswith(f"step {step} "):
                raise AssertionError(f"rank {self.rank} replays step {step} but its dry-run program says {want}")
            self.pc += 1

    def _profiled(self, step: int, mbs: list[MicroBatch | None]) -> None:
        """An eager decode step with CUDA events around every stage (per-stage times beside the plan's)."""
        events = StageEvents(self.device.type == "cuda")
        self._stage_events(mbs, events)
        try:
            self.run_step(step, mbs)
        finally:
            self._stage_events(mbs, None)
        self.metrics["profile_events"] = events  # resolved to ms once the device is idle (_Timer.finish)

    def _record(self, step: int, mbs: list[MicroBatch | None]) -> None:
        """Keep the step's tokens (and logits) on the device; read back once, after the last step."""
        for mb in mbs:
            if mb is None or mb.history is None:
                continue
            mb.history[:, step] = mb.next_input[:, 0]
            if self.spec.keep_logits and mb.last is not None:
                mb.logits[step] = mb.last.clone()

    def _collect(self, mbs: list[MicroBatch | None]) -> None:
        for mb in mbs:
            if mb is None or mb.history is None:
                continue
            hist = mb.history.cpu()
            logits = {step: t.cpu() for step, t in mb.logits.items()}
            for row, seq in enumerate(mb.seqs):
                for step in range(hist.shape[1]):
                    tok = int(hist[row, step])
                    if tok >= 0:
                        rows = logits.get(step)
                        self.results.setdefault(seq, {})[step] = (tok, rows[row].clone() if rows is not None else None)

    def _advance(self, mb: MicroBatch, layer: int) -> ExpertCall:
        """Run mb up to the routed-experts stage of `layer`: its operands."""
        call = mb.interp.advance()
        if not isinstance(call, ExpertCall) or call.layer != layer:
            got = f"layer {call.layer}" if isinstance(call, ExpertCall) else "the output"
            raise AssertionError(f"interpreter reached {got}, expected the routed experts of layer {layer}")
        return call

    def _sample(self, step: int, mb: MicroBatch) -> None:
        t0 = time.perf_counter()
        logits = mb.interp.advance()
        if isinstance(logits, ExpertCall):  # internal: run_step ran every MoE layer first
            raise AssertionError(f"interpreter reached the experts of layer {logits.layer}, expected the output")
        last = logits[:, -1, :].float()
        tokens = last.argmax(dim=-1)
        if mb.history is not None:  # static buffers: no read-back; next_input is the graph's token buffer
            if mb.next_input.shape[1] == 1:
                mb.next_input.copy_(tokens[:, None])
            else:
                mb.next_input = tokens[:, None].clone()
            mb.last = last
            self.metrics["tokens"] += len(mb.seqs)
            return
        ids = tokens.tolist()
        rows = last.cpu() if self.spec.keep_logits else None
        for row, seq in enumerate(mb.seqs):
            self.results.setdefault(seq, {})[step] = (ids[row], rows[row].clone() if rows is not None else None)
        mb.next_input = tokens[:, None]
        self.metrics["tokens"] += len(mb.seqs)
        self.metrics["clock"]["sample"] = self.metrics["clock"].get("sample", 0.0) + time.perf_counter() - t0

    def _comm(self, node: str, fn, *args):
        """Run a communication step, naming it if it fails (a peer's death surfaces here)."""
        self.node, self.in_comm = node, True
        try:
            return fn(*args)
        except (StageError, AssertionError):
            raise
        except Exception as exc:  # noqa: BLE001 - gloo/nccl raise plain RuntimeErrors
            raise StageError(self.rank, self.stage, node, f"{type(exc).__name__}: {_first_line(exc)}",
                             comm=True) from exc
        finally:
            self.in_comm = False

    def _fire(self, action: str, node: str) -> None:
        self.fault = None
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "hang":
            time.sleep(3600)
        raise StageError(self.rank, self.stage, node, f"RuntimeError: injected fault ({FAULT_ENV})")

    # --- KV-cache hand-over (prefill instance -> decode instance) -------------------------------

    def send_kv(self, mbs: list[MicroBatch | None]) -> None:
        self.stage = "kv hand-over"
        where = {seq: (mb, row) for mb in mbs if mb is not None for row, seq in enumerate(mb.seqs)}
        for src, dst, seqs in kv_routes(self.spec):
            if src != self.rank:
                continue
            per_seq = [kv_rows(where[s][0].interp.kv, [where[s][1]]) for s in seqs]  # [k0, v0, k1, ...] each
            tensors = [torch.cat([p[i] for p in per_seq]) for i in range(len(per_seq[0]))]
            tokens = torch.tensor([self.results[s][0][0] for s in seqs], dtype=torch.int64, device=self.device)
            header, payload = pack(tensors)
            self.expect("kv", "send", dst)
            t0 = time.perf_counter()
            self._comm(f"send kv to rank {dst}", _send_all, [tokens, header.to(self.device), payload], dst)
            self.metrics["bytes_sent"] += sum(t.numel() * t.element_size() for t in (tokens, header, payload))
            self.metrics["clock"]["kv_transfer"] = self.metrics["clock"].get("kv_transfer", 0.0) + time.perf_counter() - t0

    def receive_kv(self, mbs: list[MicroBatch | None]) -> None:
        self.stage = "kv hand-over"
        got: dict[int, tuple[int, list[torch.Tensor]]] = {}
        layers = list(range(self.parts.num_layers))
        for src, dst, seqs in kv_routes(self.spec):
            if dst != self.rank:
                continue
            self.expect("kv", "recv", src)
            t0 = time.perf_counter()
            tokens = torch.empty(len(seqs), dtype=torch.int64, device=self.device)
            header = torch.empty((2 * len(layers), 5), dtype=torch.int64, device=self.device)
            self._comm(f"receive kv from rank {src}", _recv_all, [tokens, header], src)
            payload = torch.empty(payload_numel(header.cpu()), dtype=self.parts.dtype, device=self.device)
            self._comm(f"receive kv from rank {src}", _recv_all, [payload], src)
            tensors = unpack(header.cpu(), payload)
            for row, seq in enumerate(seqs):
                got[seq] = (int(tokens[row]), [t[row:row + 1] for t in tensors])
            self.metrics["clock"]["kv_transfer"] = self.metrics["clock"].get("kv_transfer", 0.0) + time.perf_counter() - t0
        for mb in mbs:
            if mb is None:
                continue
            per_seq = [got[s][1] for s in mb.seqs]
            rows = [torch.cat([p[i] for p in per_seq]) for i in range(2 * len(layers))]
            if self.spec.static:
                kv = mb.interp.kv
                assert isinstance(kv, StaticKVCache)
                for i, layer in enumerate(layers):
                    kv.load(layer, rows[2 * i], rows[2 * i + 1])
            else:
                mb.interp.kv = kv_from_rows(layers, rows)
            mb.interp.past = self.spec.prompt_len
            mb.next_input = torch.tensor([[got[s][0]] for s in mb.seqs], dtype=torch.int64, device=self.device)

    # --- results --------------------------------------------------------------------------------

    def gather(self) -> None:
        self.stage, self.node = "finish", "gather results"
        self.expect("gather results", group=WORLD)
        payload = {"rank": self.rank, "results": self.results, "metrics": self.metrics}
        out: list[Any] | None = [None] * self.spec.world_size if self.rank == 0 else None
        self._comm("gather results", dist.gather_object, payload, out, 0)
        if out is not None:  # rank 0
            self.collected = out


GRAPH_FROM = 3  # first decode step replayed from a CUDA graph
PROFILE_STEP = 2  # the decode step timed per stage (each stage a CUDA graph of its own between CUDA events)


def _max_rows(spec: RunSpec, inst: InstanceSpec, phase: str) -> int:
    """The instance's largest microbatch (sequences) in `phase`: the same number on every member."""
    seqs = sequences_of(spec, phase) if phase in inst.phases else {}
    sizes = [len(mb) for r in inst.attention_ranks for mb in microbatches_of(seqs.get(r, []), inst.microbatches)]
    return max(sizes + [1])


class _Timer:
    """Step times per phase: host clocks on a CPU; CUDA events on a GPU, read once when the run ends."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list[tuple[str, bool, object, object]] = []
        self._open: tuple[str, bool, object] | None = None

    def _mark(self) -> object:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def start(self, phase: str, graphed: bool) -> None:
        self._open = (phase, graphed, self._mark())

    def stop(self) -> None:
        assert self._open is not None
        phase, graphed, t0 = self._open
        self.spans.append((phase, graphed, t0, self._mark()))
        self._open = None

    def finish(self, metrics: dict) -> None:
        """Fill metrics["steps"] (seconds per phase), ["graph_steps"] and the profiled stage times."""
        if self.cuda:
            torch.cuda.synchronize()
        graph = [0, 0.0]
        for phase, graphed, a, b in self.spans:
            dt = a.elapsed_time(b) / 1e3 if self.cuda else b - a  # type: ignore[attr-defined,operator]
            metrics["steps"][phase] = metrics["steps"].get(phase, 0.0) + dt
            if graphed:
                graph[0] += 1
                graph[1] += dt
        metrics["graph_steps"] = {"count": graph[0], "seconds": graph[1]}
        events = metrics.pop("profile_events", None)
        if events is not None:
            metrics["profiled_step_ms"] = events.ms_by_kind()


def _send_all(tensors: list[torch.Tensor], dst: int) -> None:
    for t in tensors:
        dist.send(t.contiguous(), dst)


def _recv_all(tensors: list[torch.Tensor], src: int) -> None:
    for t in tensors:
        dist.recv(t, src)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _parse_fault(text: str | None, rank: int) -> tuple[int, str] | None:
    if not text:
        return None
    r, step, action = text.split(":")
    return (int(step), action) if int(r) == rank else None


def _thread_lock_for_tqdm() -> None:
    """torch.fx's Interpreter.run (the passes' shape propagation, while the worker loads its program)
    opens a disabled tqdm bar, whose first use creates a multiprocessing lock; a worker leaves with
    os._exit, so the launcher's resource tracker would report that semaphore as leaked. A worker is
    one process: a thread lock serves."""
    import threading

    from torch.hub import tqdm

    set_lock = getattr(tqdm, "set_lock", None)  # absent from torch's stand-in when tqdm is not installed
    if set_lock is not None:
        set_lock(threading.RLock())


def _die_with_parent() -> None:
    """Linux: get SIGKILLed when the launcher dies, so a killed `podplan run` leaves no orphans."""
    parent = os.environ.get("PODPLAN_PARENT_PID")
    if not parent or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != int(parent):  # the parent died before prctl took effect
        os._exit(1)


def _watch_launcher(pid: int) -> None:
    """Exit as soon as the launcher process is gone (killed launcher -> no orphan workers)."""
    import threading

    def watch() -> None:
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:
                pass
            time.sleep(0.5)

    threading.Thread(target=watch, name="podplan-launcher-watch", daemon=True).start()


def write_results(worker: RankWorker, out_dir: Path) -> None:
    """Rank 0: tokens [N, T], logits [N, T, V] and every rank's metrics, in one torch file (atomic)."""
    n, t = worker.spec.prompts, worker.spec.new_tokens
    merged: dict[int, dict[int, tuple[int, torch.Tensor | None]]] = {}
    for item in worker.collected:
        for seq, steps in item["results"].items():
            merged.setdefault(seq, {}).update(steps)
    tokens = torch.full((n, t), -1, dtype=torch.int64)
    logits = None
    for seq, steps in merged.items():
        for step, (tok, row) in steps.items():
            tokens[seq, step] = tok
            if row is None:
                continue
            if logits is None:
                logits = torch.zeros((n, t, row.shape[-1]), dtype=torch.float32)
            logits[seq, step] = row
    data = {"tokens": tokens, "logits": logits, "metrics": [item["metrics"] for item in worker.collected]}
    tmp = out_dir / ".result.pt.tmp"
    torch.save(data, tmp)
    os.replace(tmp, out_dir / "result.pt")


def report_failure(out_dir: Path, rank: int, worker: RankWorker | None, exc: BaseException) -> None:
    """Write what failed where; a communication error is secondary (a peer probably died first)."""
    if isinstance(exc, StageError):
        message = str(exc)
    else:
        stage = worker.stage if worker else "setup"
        node = worker.node if worker else "build"
        message = str(StageError(rank, stage, node, f"{type(exc).__name__}: {_first_line(exc)}"))
    secondary = bool(worker and worker.in_comm) or (isinstance(exc, StageError) and exc.comm)
    record = {"rank": rank, "message": message, "secondary": secondary, "time": time.time()}
    tmp = out_dir / f".rank{rank}.error.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, out_dir / f"rank{rank}.error.json")


def forked_main(job: str, env: dict[str, str], log_path: str) -> None:
    """Entry of a worker forked by the launcher's forkserver: its env, its log, then `main`."""
    os.environ.update(env)
    os.environ["PODPLAN_PARENT_PID"] = str(os.getppid())
    # The forkserver hands every child its "parent alive" pipe; holding it would keep the server (and,
    # through PDEATHSIG, this worker) alive after the launcher dies. Drop it.
    from multiprocessing import forkserver

    alive = getattr(forkserver._forkserver, "_forkserver_alive_fd", None)
    if alive is not None:
        os.close(alive)
        forkserver._forkserver._forkserver_alive_fd = None  # type: ignore[attr-defined]  # private, see above
    _watch_launcher(int(env["PODPLAN_LAUNCHER_PID"]))
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    code = main([job])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m runtime.worker JOB.json  (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the env)",
              file=sys.stderr)
        return 2
    job = Path(argv[0])
    out_dir = job.parent
    rank = int(os.environ["RANK"])
    _die_with_parent()
    _thread_lock_for_tqdm()
    torch.set_num_threads(int(os.environ.get("PODPLAN_THREADS", "1")))
    worker = None
    try:
        spec = RunSpec.from_json(job.read_text())
        started = int(os.environ.get("WORLD_SIZE", spec.world_size))
        if started != spec.world_size:
            raise ValueError(f"{started} processes were started, the job needs {spec.world_size}: "
                             f"use torchrun --nproc-per-node {spec.world_size}")
        local = int(os.environ.get("LOCAL_RANK", rank))
        device = torch.device("cuda", local) if spec.backend == "nccl" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = timedelta(seconds=COLLECTIVE_TIMEOUT_S)
        store = None
        if os.environ.get("PODPLAN_CLIENT_STORE"):  # the launcher serves the store (torchrun: rank 0 does)
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), spec.world_size,
                                  is_master=False, timeout=timeout)
        # NCCL: bind the group to this rank's GPU, rather than letting torch guess it from the rank
        dist.init_process_group(spec.backend, rank=rank, world_size=spec.world_size, timeout=timeout, store=store,
                                device_id=device if device.type == "cuda" else None)
        worker = RankWorker(spec, rank, device, read_program(out_dir / PROGRAM_FILE))
        worker.setup()
        worker.run()
        if rank == 0:
            write_results(worker, out_dir)
    except BaseException as exc:  # noqa: BLE001 - every failure is reported to the launcher, then we exit
        report_failure(out_dir, rank, worker, exc)
        sys.stderr.flush()
        os._exit(1)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
