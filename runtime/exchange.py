"""Dispatch and combine through fixed-capacity buffers: tokens to their expert slots and back, with
`all_to_all_single` over an instance, and no wait for the device anywhere.

Every member of an instance's group runs the same three calls per (layer, microbatch), whatever its
role. Senders are the instance's attention ranks, destinations its expert ranks and the shared-expert
ranks that serve other ranks' tokens. Each sender gives each destination a block of exactly C rows
(the capacity), so every split size is known on the host before the step starts: no counts are
exchanged, nothing is read back, and a whole decode step can be captured as a CUDA graph.

A row carries the hidden vector and, in its last 4 bytes, the destination's local slot (S: the
shared experts; -1: an empty row), so one all_to_all moves both. An expert rank runs its shard of the
layer's routed-experts stage module on all its rows (empty and shared rows at weight 0) and, when it
serves shared experts, the shared-experts stage module masked to the shared rows. Rows leave
unweighted and come back unweighted; the sender applies the routing weights and sums the top-k
contributions exactly as transformers' batched_mm experts do.

A one-member instance (one GPU holding every expert) has nothing to move: its routed-experts stage
runs on the tokens directly, as the monolithic model's would.

Capacity: the worst case (every assignment of the largest microbatch to one destination) unless the
run sets a capacity factor; then C = ceil(factor * assignments / destinations). Assignments beyond a
block's capacity are not sent; they are counted on the device (`overflow`), and the worker fails
the run after the step naming the layer, never using a result computed without them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.fx as fx

from runtime.errors import StageError
from runtime.interpreter import ExpertCall, StageEvents, failing_node
from runtime.parts import ExpertStage, SharedStage
from runtime.routing import ReplicaTable, uniform_of
from runtime.spec import InstanceSpec


@dataclass(frozen=True)
class TokenRoute:
    """One microbatch's tokens in one step, on the device: their keys [T] and the uniforms [T] that
    choose their replicas. The same for every layer of the step, so it is made once per step."""

    keys: torch.Tensor
    uniforms: torch.Tensor


@dataclass
class Pending:
    """One (layer, microbatch) exchange in flight."""

    layer: int
    rows: int  # T: tokens the rank sent for this microbatch
    k: int
    capacity: int  # C: rows per (sender, destination) block
    where: torch.Tensor | None  # [A] row of each assignment in the send buffer (D*C: not sent); None: sent none
    weights: torch.Tensor | None  # [T, k]; None exactly when where is
    recv: torch.Tensor  # [senders*C, H + tag] rows received (empty unless this rank is a destination)
    work: dist.Work | None  # the dispatch all_to_all (None: a one-member group, nothing in flight)
    has_shared: bool = False
    direct: torch.Tensor | None = None  # one-member group: the routed output [T, H], computed in place


@dataclass
class Combining:
    """One exchange whose expert outputs are on their way back (what `compute` started)."""

    pending: Pending
    back: torch.Tensor  # [D*C + 1, H] this rank's sent rows as the experts return them (+ a zero row)
    work: dist.Work | None


class Exchange:
    """The data movement of one rank in one instance; counts bytes sent to other ranks and time spent."""

    def __init__(self, inst: InstanceSpec, rank: int, group, *, num_experts: int, hidden: int, dtype: torch.dtype,
                 device: torch.device, experts: dict[int, ExpertStage], shared: dict[int, SharedStage],
                 remote_shared: bool, metrics: dict, capacity_factor: float | None = None):
        self.inst, self.rank, self.group = inst, rank, group
        self.members = list(inst.ranks)
        self.me = self.members.index(rank)
        self.S = inst.slots_per_rank
        self.hidden, self.dtype, self.device = hidden, dtype, device
        self.experts, self.shared = experts, shared
        self.remote_shared = remote_shared
        self.capacity_factor = capacity_factor
        self.tables = {lp.layer: ReplicaTable(lp, num_experts).to(device) for lp in inst.layers}
        # destinations in member order (all_to_all_single lays blocks out by group member): the expert
        # ranks and the shared-expert ranks; block j of a send buffer goes to dests[j]
        shared_ranks = [r for r in inst.shared_ranks if r in self.members]
        self.dests = [m for m in self.members if m in inst.expert_ranks or m in shared_ranks]
        self.senders = list(inst.attention_ranks)
        self.expert_dest = torch.tensor([self.dests.index(r) for r in inst.expert_ranks], dtype=torch.int64,
                                        device=device)
        self.shared_dest = torch.tensor([self.dests.index(r) for r in shared_ranks], dtype=torch.int64, device=device)
        self.any_remote_shared = any(r not in inst.shared_ranks for r in inst.attention_ranks) and bool(shared_ranks)
        # extra columns whose last 4 bytes hold the int32 slot (rows stay a whole number of int32s)
        size = torch.empty(0, dtype=dtype).element_size()
        self.tag = next(t for t in range(1, 9) if t * size >= 4 and (hidden + t) * size % 4 == 0)
        self.overflow = torch.zeros((), dtype=torch.int64, device=device)  # assignments beyond capacity
        self.overflow_at: list[str] = []  # (host) where overflow was first seen, filled by check_overflow
        self.metrics = metrics
        self.events: StageEvents | None = None  # set for a profiled step
        self.expect: Callable[[str], None] = lambda key: None  # the worker installs its program check here
        self.where: Callable[[], str] = lambda: "?"  # and the step it is in, for errors of the stages run here

    # --- capacity ------------------------------------------------------------------------------

    def capacity(self, tokens: int, k: int) -> int:
        """Rows per (sender, destination) block for microbatches of at most `tokens` tokens."""
        assignments = tokens * k + (tokens if self.any_remote_shared else 0)
        if self.capacity_factor is None:
            return max(assignments, 1)
        return max(1, min(assignments, math.ceil(self.capacity_factor * assignments / max(len(self.dests), 1))))

    def _splits(self, C: int) -> tuple[list[int], list[int]]:
        """(rows this rank sends to each member, rows it receives from each member) in member order."""
        sending = self.rank in self.senders
        receiving = self.rank in self.dests
        ins = [C if sending and m in self.dests else 0 for m in self.members]
        outs = [C if receiving and m in self.senders else 0 for m in self.members]
        return ins, outs

    def _a2a(self, out: torch.Tensor, inp: torch.Tensor, out_split: list[int], in_split: list[int]):
        """all_to_all over the group (async); a one-member group copies nothing and returns None."""
        per_row = inp[0].numel() * inp.element_size() if inp.shape[0] else 0
        self.metrics["bytes_sent"] += sum(n for i, n in enumerate(in_split) if i != self.me) * per_row
        if len(self.members) == 1:
            return None
        return dist.all_to_all_single(out, inp, out_split, in_split, group=self.group, async_op=True)

    # --- the three calls -----------------------------------------------------------------------

    def route(self, keys: torch.Tensor) -> TokenRoute:
        """The route of tokens with keys [T] (`runtime.routing.token_keys`); keys may already be on the device."""
        keys_d = keys.to(self.device)
        return TokenRoute(keys_d, uniform_of(keys_d))

    def dispatch(self, step: int, mb: int, layer: int, outgoing: tuple[ExpertCall, TokenRoute] | None,
                 tokens: int, k: int) -> Pending:
        """Route and send one microbatch's rows into fixed blocks; returns the exchange.

        `outgoing` is the experts node's operands and its tokens' route, or None: this rank sends
        nothing. `tokens` is the instance's largest microbatch in this step (the same on every member)."""
        D, dev, H = len(self.dests), self.device, self.hidden
        t0 = time.perf_counter()
        mark = self.events.mark() if self.events is not None else None
        if len(self.members) == 1 and outgoing is not None and outgoing[0].shared_in is None:
            return self._local(step, mb, layer, outgoing[0], t0)
        C = self.capacity(tokens, k)
        in_split, out_split = self._splits(C)
        send = torch.zeros((D * C + 1, H + self.tag), dtype=self.dtype, device=dev)  # + a row for the dropped
        send_slot = send.view(torch.int32)[:, -1]
        send_slot.fill_(-1)
        where = weights = None
        T, has_shared = 0, False
        if outgoing is not None:
            call, route = outgoing
            T = call.ids.shape[0]
            phys = self.tables[layer].pick(call.ids, route.uniforms).reshape(-1)  # [T*k] physical slot
            dest = self.expert_dest[phys // self.S]
            slot = phys % self.S
            # each token's row once per top-k choice (repeat_interleave with an int copies its count to the device)
            rows = call.hidden.reshape(-1, H)[:, None, :].expand(-1, k, -1).reshape(-1, H)
            has_shared = call.shared_in is not None
            if call.shared_in is not None:  # one more row per token, to a shared rank picked by token
                dest = torch.cat([dest, self.shared_dest[route.keys % len(self.shared_dest)]])
                slot = torch.cat([slot, torch.full((T,), self.S, dtype=torch.int64, device=dev)])
                rows = torch.cat([rows, call.shared_in])
            # position of each assignment within its destination's block, without a sort or a read-back
            # (one_hot would check the ids' range on the host)
            onehot = (dest[:, None] == torch.arange(D, device=dev)[None, :]).to(torch.int64)
            pos = onehot.cumsum(0).gather(1, dest[:, None]).squeeze(1) - 1
            fits = pos < C
            self.overflow += (~fits).sum()
            where = torch.where(fits, dest * C + pos, D * C)
            send[where, :H] = rows.to(self.dtype)
            send_slot[where] = slot.to(torch.int32)  # the dropped land in row D*C, which is never sent
            weights = call.weights
        n_in = sum(out_split)
        recv = torch.empty((n_in, H + self.tag), dtype=self.dtype, device=dev) if len(self.members) > 1 else None
        self.expect(f"step {step} layer {layer} mb {mb} dispatch")
        src = send[:D * C] if self.rank in self.senders else send[:0]
        if recv is None:  # one member: its own blocks are what it receives
            recv = src if self.rank in self.dests else src[:0]
        work = self._a2a(recv, src, out_split, in_split)
        if self.events is not None:
            self.events.add("dispatch", f"layer{layer}_dispatch", mark)
        self.metrics["clock"]["dispatch"] = self.metrics["clock"].get("dispatch", 0.0) + time.perf_counter() - t0
        return Pending(layer, T, k, C, where, weights, recv, work, has_shared=has_shared)

    def _local(self, step: int, mb: int, layer: int, call: ExpertCall, t0: float) -> Pending:
        """A one-member instance hosts every expert: no blocks, no replica choice (all replicas are here);
        its routed-experts stage runs on the tokens as the program would call it."""
        self.expect(f"step {step} layer {layer} mb {mb} dispatch")
        stage = self.experts[layer]
        hidden = call.hidden.reshape(-1, self.hidden)
        try:
            if self.events is not None:
                out = self.events.run("routed_experts", stage.name, stage.weighted, hidden, call.ids, call.weights)
            else:
                out = stage.weighted(hidden, call.ids, call.weights)
            out = out.to(self.dtype)
        except Exception as exc:  # noqa: BLE001 - any failure inside the model is reported with its node
            raise StageError(self.rank, self.where(), f"{failing_node(stage.module, exc)} in {stage.name}",
                             f"{type(exc).__name__}: {exc}") from exc
        clock, per_stage, dt = self.metrics["clock"], self.metrics["stage_clock"], time.perf_counter() - t0
        clock["routed_experts"] = clock.get("routed_experts", 0.0) + dt
        per_stage[stage.name] = per_stage.get(stage.name, 0.0) + dt
        T, k = call.ids.shape
        return Pending(layer, T, k, 0, None, None, call.hidden[:0], None, direct=out)

    def compute(self, step: int, mb: int, p: Pending) -> Combining:
        """Wait for the rows, run the hosted slots (and shared experts) on them, send the results back."""
        if p.direct is not None:
            self.expect(f"step {step} layer {p.layer} mb {mb} combine")
            return Combining(p, p.direct, None)
        clock = self.metrics["clock"]
        t0 = time.perf_counter()
        if p.work is not None:
            p.work.wait()
        t1 = time.perf_counter()
        H = self.hidden
        rows = p.recv[:, :H]
        slot = p.recv.view(torch.int32)[:, -1].to(torch.int64)
        out = torch.zeros((rows.shape[0], H), dtype=self.dtype, device=self.device)
        stage = self.experts.get(p.layer)
        mark = self.events.mark() if self.events is not None else None
        if stage is not None and rows.shape[0]:
            out = self._run(stage.name, stage.module, stage, rows, slot)
            if self.events is not None:
                self.events.add("routed_experts", stage.name, mark)
        t2 = time.perf_counter()
        sstage = self.shared.get(p.layer) if self.rank in self.dests else None
        if sstage is not None and self.any_remote_shared and rows.shape[0]:
            mark = self.events.mark() if self.events is not None else None
            ys = self._run(sstage.name, sstage.module, sstage, rows.contiguous())
            out = out + ys * (slot == self.S)[:, None].to(ys.dtype)
            if self.events is not None:
                self.events.add("shared_experts", sstage.name, mark)
        t3 = time.perf_counter()
        C = p.capacity
        in_split, out_split = self._splits(C)
        D = len(self.dests)
        back = torch.zeros((D * C + 1, H), dtype=self.dtype, device=self.device)  # last row: the dropped
        self.expect(f"step {step} layer {p.layer} mb {mb} combine")
        if len(self.members) == 1:
            if self.rank in self.dests and self.rank in self.senders:
                back[:D * C] = out
            work = None
        else:
            src = out.to(self.dtype).contiguous()
            dst = back[:D * C] if self.rank in self.senders else back[:0]
            work = self._a2a(dst, src, in_split, out_split)
        t4 = time.perf_counter()
        clock["dispatch"] = clock.get("dispatch", 0.0) + t1 - t0
        clock["routed_experts"] = clock.get("routed_experts", 0.0) + t2 - t1
        clock["shared_experts"] = clock.get("shared_experts", 0.0) + t3 - t2
        per_stage = self.metrics["stage_clock"]
        if stage is not None:
            per_stage[stage.name] = per_stage.get(stage.name, 0.0) + t2 - t1
        if sstage is not None:
            per_stage[sstage.name] = per_stage.get(sstage.name, 0.0) + t3 - t2
        clock["combine"] = clock.get("combine", 0.0) + t4 - t3
        self.metrics["expert_rows"] += rows.shape[0]
        return Combining(p, back, work)

    def _run(self, name: str, module: fx.GraphModule, stage: Callable[..., torch.Tensor],
             *args: torch.Tensor) -> torch.Tensor:
        """Run a stage module on received rows; a failure names its node (not a communication error)."""
        try:
            return stage(*args)
        except Exception as exc:  # noqa: BLE001 - any failure inside the model is reported with its node
            raise StageError(self.rank, self.where(), f"{failing_node(module, exc)} in {name}",
                             f"{type(exc).__name__}: {exc}") from exc

    def finish(self, c: Combining) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Wait for the results; (routed output [T, H], shared output [T, H] or None) for the rows sent."""
        t0 = time.perf_counter()
        if c.work is not None:
            c.work.wait()
        clock = self.metrics["clock"]
        clock["combine"] = clock.get("combine", 0.0) + time.perf_counter() - t0
        p = c.pending
        if p.direct is not None:
            return p.direct, None
        if p.where is None or p.weights is None:  # this rank sent no rows
            return None
        mark = self.events.mark() if self.events is not None else None
        y = c.back[p.where]  # dropped assignments read the zero row (and the step fails on overflow)
        A = p.rows * p.k
        # batched_mm's reduction: weight each top-k output, sum over k, cast to the hidden dtype
        routed = (y[:A].view(p.rows, p.k, self.hidden) * p.weights.reshape(p.rows, p.k, 1)).sum(dim=1).to(self.dtype)
        shared = y[A:] if p.has_shared else None
        if self.events is not None:
            self.events.add("combine", f"layer{p.layer}_combine", mark)
        return routed, shared
