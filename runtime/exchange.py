"""Dispatch and combine: tokens to their expert slots and back, with all_to_all_single over an instance.

Every member of an instance's group runs the same three calls per (layer, microbatch), whatever its
role: attention-only ranks send rows and host no slots, expert-only ranks send no rows and compute,
colocated ranks do both. The wire format per layer and microbatch is
  counts:   [G, S+1] int64 rows per (destination, local slot; column S = shared experts), equal splits;
  dispatch: hidden rows sorted by (destination, slot), uneven splits from the counts;
  combine:  the expert outputs, same rows, splits reversed.
Rows leave unweighted and come back unweighted; the attention rank applies the routing weights and
sums the top-k contributions exactly as transformers' batched_mm experts do. An expert rank runs
its shard of the layer's routed-experts stage module on the rows it receives (`runtime.parts.ExpertStage`),
a shared-expert rank the layer's shared-experts stage module (`runtime.parts.SharedStage`).

On a GPU the host waits for the device once per (layer, microbatch): `all_to_all_single` needs the
split sizes on the host, so the counts come back in one copy. Everything else (replica choice,
sorting, counting, the received rows' slots) stays on the device, and the receiver finds its routed
and shared rows as contiguous ranges from those counts, never with `nonzero`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.fx as fx

from runtime.errors import StageError
from runtime.interpreter import ExpertCall, failing_node
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
    order: torch.Tensor | None  # [A] permutation: send position -> assignment index; None: sent no rows
    weights: torch.Tensor | None  # [T, k]; None exactly when order is
    in_split: list[int]  # rows sent to each group member
    out_split: list[int]  # rows received from each group member
    slot_of_row: torch.Tensor  # [R] local slot (S = shared) of every received row, on the device
    recv_counts: list[list[int]]  # [G][S+1] rows received from each member per local slot (host)
    recv: torch.Tensor
    work: dist.Work  # the dispatch all_to_all
    has_shared: bool = False


@dataclass
class Combining:
    """One exchange whose expert outputs are on their way back (what `compute` started)."""

    pending: Pending
    back: torch.Tensor  # [sum(in_split), H] the rows this rank sent, as the experts return them
    work: dist.Work  # the combine all_to_all


class Exchange:
    """The data movement of one rank in one instance; counts bytes sent to other ranks and time spent."""

    def __init__(self, inst: InstanceSpec, rank: int, group, *, num_experts: int, hidden: int, dtype: torch.dtype,
                 device: torch.device, experts: dict[int, ExpertStage], shared: dict[int, SharedStage],
                 remote_shared: bool, metrics: dict):
        self.inst, self.rank, self.group = inst, rank, group
        self.members = list(inst.ranks)
        self.me = self.members.index(rank)
        self.S = inst.slots_per_rank
        self.hidden, self.dtype, self.device = hidden, dtype, device
        self.experts, self.shared = experts, shared
        self.remote_shared = remote_shared
        self.tables = {lp.layer: ReplicaTable(lp, num_experts).to(device) for lp in inst.layers}
        self.expert_pos = torch.tensor([self.members.index(r) for r in inst.expert_ranks], dtype=torch.int64,
                                       device=device)
        shared_ranks = [r for r in inst.shared_ranks if r in self.members]
        self.shared_pos = torch.tensor([self.members.index(r) for r in shared_ranks], dtype=torch.int64,
                                       device=device)
        self.slot_pattern = torch.arange(self.S + 1, device=device).repeat(len(self.members))  # [G*(S+1)]
        self.metrics = metrics
        self.expect: Callable[[str], None] = lambda key: None  # the worker installs its program check here
        self.where: Callable[[], str] = lambda: "?"  # and the step it is in, for errors of the stages run here

    def _a2a(self, out: torch.Tensor, inp: torch.Tensor, out_split: list[int] | None, in_split: list[int] | None,
             *, async_op: bool):
        G = len(self.members)
        per_row = inp[0].numel() * inp.element_size() if inp.shape[0] else 0
        if in_split is None:  # equal splits: one block of rows to every member
            to_others = (G - 1) * (inp.shape[0] // G)
        else:
            to_others = sum(n for i, n in enumerate(in_split) if i != self.me)
        self.metrics["bytes_sent"] += to_others * per_row
        return dist.all_to_all_single(out, inp, out_split, in_split, group=self.group, async_op=async_op)

    def dispatch(self, step: int, mb: int, layer: int, outgoing: tuple[ExpertCall, TokenRoute] | None) -> Pending:
        """Route and send one microbatch's rows; returns the exchange.

        `outgoing` is the experts node's operands and its tokens' route, or None: this rank sends nothing.
        """
        G, S, dev = len(self.members), self.S, self.device
        t0 = time.perf_counter()
        if outgoing is None:
            key = torch.zeros(0, dtype=torch.int64, device=dev)
            send = torch.zeros((0, self.hidden), dtype=self.dtype, device=dev)
            T, k, order, weights, has_shared = 0, 0, None, None, False
        else:
            call, route = outgoing
            T, k = call.ids.shape
            phys = self.tables[layer].pick(call.ids, route.uniforms).reshape(-1)  # [T*k] physical slot
            dest = self.expert_pos[phys // S]
            slot = phys % S
            src_rows = torch.arange(T, device=dev).repeat_interleave(k)
            has_shared = call.shared_in is not None
            if call.shared_in is not None:
                # shared experts: one more row per token, to a shared rank picked by token
                pick = route.keys % len(self.shared_pos)
                dest = torch.cat([dest, self.shared_pos[pick]])
                slot = torch.cat([slot, torch.full((T,), S, dtype=torch.int64, device=dev)])
            key = dest * (S + 1) + slot
            order = torch.sort(key, stable=True).indices
            parts = [call.hidden.reshape(-1, self.hidden)[src_rows]]
            if call.shared_in is not None:
                parts.append(call.shared_in)
            send = torch.cat(parts)[order].contiguous()
            weights = call.weights
        # scatter_add, not bincount: CUDA's bincount reads the maximum back to the host
        counts = torch.zeros(G * (S + 1), dtype=torch.int64, device=dev).scatter_add_(0, key, torch.ones_like(key))
        recv_counts = torch.empty_like(counts)
        self.expect(f"step {step} layer {layer} mb {mb} counts")
        self._a2a(recv_counts, counts, None, None, async_op=False)
        both = torch.cat([counts, recv_counts]).view(2, G, S + 1).tolist()  # the one wait for the device
        in_split = [sum(row) for row in both[0]]
        out_split = [sum(row) for row in both[1]]
        recv = torch.empty((sum(out_split), self.hidden), dtype=self.dtype, device=dev)
        self.expect(f"step {step} layer {layer} mb {mb} dispatch")
        work = self._a2a(recv, send, out_split, in_split, async_op=True)
        slot_of_row = torch.repeat_interleave(self.slot_pattern, recv_counts, output_size=recv.shape[0])
        self.metrics["clock"]["dispatch"] = self.metrics["clock"].get("dispatch", 0.0) + time.perf_counter() - t0
        return Pending(layer, T, k, order, weights, in_split, out_split, slot_of_row, both[1], recv, work,
                       has_shared=has_shared)

    def route(self, keys: torch.Tensor) -> TokenRoute:
        """The route of tokens with keys [T] (`runtime.routing.token_keys`), moved to the device once."""
        keys_d = keys.to(self.device)
        return TokenRoute(keys_d, uniform_of(keys_d))

    def _ranges(self, p: Pending) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Row ranges of the received rows: routed ones and shared ones, per sending member.

        Rows arrive grouped by sender, each group sorted by local slot, so a sender's routed rows come
        first and its shared-expert rows (slot S) last."""
        routed, shared, at = [], [], 0
        for row in p.recv_counts:
            n_routed = sum(row[:self.S])
            routed.append((at, at + n_routed))
            shared.append((at + n_routed, at + n_routed + row[self.S]))
            at += n_routed + row[self.S]
        return [r for r in routed if r[1] > r[0]], [r for r in shared if r[1] > r[0]]

    def compute(self, step: int, mb: int, p: Pending) -> Combining:
        """Wait for the rows, run the hosted slots (and shared experts) on them, send the results back."""
        clock = self.metrics["clock"]
        t0 = time.perf_counter()
        p.work.wait()
        t1 = time.perf_counter()
        out = torch.empty_like(p.recv)
        routed, shared = self._ranges(p)
        n_routed = sum(b - a for a, b in routed)
        if routed:
            rows = torch.cat([p.recv[a:b] for a, b in routed])
            slots = torch.cat([p.slot_of_row[a:b] for a, b in routed])
            stage = self.experts[p.layer]
            y = self._run(stage.name, stage.module, stage, rows, slots)
            at = 0
            for a, b in routed:
                out[a:b] = y[at:at + b - a]
                at += b - a
        t2 = time.perf_counter()
        if shared:
            sstage = self.shared[p.layer]
            y = self._run(sstage.name, sstage.module, sstage, torch.cat([p.recv[a:b] for a, b in shared]))
            at = 0
            for a, b in shared:
                out[a:b] = y[at:at + b - a]
                at += b - a
        t3 = time.perf_counter()
        back = torch.empty((sum(p.in_split), self.hidden), dtype=self.dtype, device=self.device)
        self.expect(f"step {step} layer {p.layer} mb {mb} combine")
        work = self._a2a(back, out, p.in_split, p.out_split, async_op=True)
        t4 = time.perf_counter()
        clock["dispatch"] = clock.get("dispatch", 0.0) + t1 - t0
        clock["routed_experts"] = clock.get("routed_experts", 0.0) + t2 - t1
        clock["shared_experts"] = clock.get("shared_experts", 0.0) + t3 - t2
        per_stage = self.metrics["stage_clock"]
        if routed:
            per_stage[stage.name] = per_stage.get(stage.name, 0.0) + t2 - t1
        if shared:
            per_stage[sstage.name] = per_stage.get(sstage.name, 0.0) + t3 - t2
        clock["combine"] = clock.get("combine", 0.0) + t4 - t3
        self.metrics["expert_rows"] += n_routed
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
        c.work.wait()
        clock = self.metrics["clock"]
        clock["combine"] = clock.get("combine", 0.0) + time.perf_counter() - t0
        p = c.pending
        if p.order is None or p.weights is None:  # this rank sent no rows
            return None
        back = torch.empty_like(c.back)
        back[p.order] = c.back
        A = p.rows * p.k
        y = back[:A].view(p.rows, p.k, self.hidden)
        # batched_mm's reduction: weight each top-k output, sum over k, cast to the hidden dtype
        routed = (y * p.weights.reshape(p.rows, p.k, 1)).sum(dim=1).to(self.dtype)
        shared = back[A:] if p.has_shared else None
        return routed, shared
