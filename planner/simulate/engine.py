"""The event loop: arrivals -> prefill batches -> KV transfer -> continuous decode batching.

Step 1: arrivals join one FIFO queue; an idle prefill instance takes prompts from its head up to its
        token budget. A prompt that does not fit is chunked (its first piece now, the rest leads that
        instance's next batch), as is any prompt longer than one die's share of the budget.
Step 2: a batch ends after the cost model's batch time; its finished prompts emit their first token
        after the KV transfer and join the decode instance with the fewest sequences.
Step 3: a decode instance admits waiting sequences at step boundaries up to the plan's batch and its
        KV memory, and runs steps of the cost model's time at the batch's actual size and mean context.
Step 4: each step yields 1 + Bernoulli(MTP acceptance) tokens per sequence; the steps a request needs
        are drawn when it is generated, so a sequence leaves at a known step.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_right
from collections import deque
from dataclasses import dataclass

import numpy as np

from planner.simulate.fleet import Fleet
from planner.simulate.workload import Requests

_PREFILL_DONE, _KV_ARRIVE, _DECODE_DONE = 0, 1, 2


@dataclass(frozen=True)
class Outcome:
    """What happened to every request, and the system over time.

    first_token, finish: [n] s (NaN: not reached before the horizon); samples: queue lengths at
    fixed times; step_end, step_tokens: [steps] the end (s) and tokens (expected) of every decode step.
    """

    requests: Requests
    first_token: np.ndarray
    finish: np.ndarray
    samples: dict[str, list[float]]
    step_end: np.ndarray
    step_tokens: np.ndarray
    prefill_batches: int
    end: float  # simulated time when the loop stopped (s)


def decode_steps(tokens: np.ndarray, accept: float, rng: np.random.Generator) -> np.ndarray:
    """[n] decode steps to produce `tokens` tokens when a step yields 1 + Bernoulli(accept) tokens.

    Exact, in rounds: with `left` tokens to go, left // 2 steps cannot overshoot, so they are drawn
    at once as a binomial; a last single token takes one step.
    """
    left = tokens.astype(np.int64).copy()
    if accept <= 0:
        return left
    steps = np.zeros_like(left)
    while True:
        two = left >= 2
        one = left == 1
        if not two.any() and not one.any():
            return steps
        s = np.where(two, left // 2, 0)
        got = s + rng.binomial(s, accept)
        steps += s + one
        left = np.maximum(0, left - got - one)


def run(fleet: Fleet, reqs: Requests, *, seed: int = 0, horizon: float = math.inf, sample_every: float = 1.0,
        chunked: bool = True) -> Outcome:
    """Simulate `reqs` on `fleet` until every request finished or the clock passes `horizon` (s)."""
    if fleet.aggregated:  # one phase: the decode instances run the prompts in chunks (planner.simulate.aggregated)
        from planner.simulate.aggregated import run_aggregated

        return run_aggregated(fleet, reqs, seed=seed, horizon=horizon, sample_every=sample_every)
    shape, topo = fleet.shape, fleet.topo
    accept = fleet.workload.mtp_accept
    n = len(reqs)
    arr = reqs.arrival
    arr_l = arr.tolist()
    inp = reqs.input_len.tolist()
    out = reqs.output_len.tolist()
    need = decode_steps(np.maximum(0, reqs.output_len - 1), accept, np.random.default_rng([seed, 2])).tolist()
    first = [math.nan] * n
    fin = [math.nan] * n
    heap: list[tuple] = []
    seq = 0

    def push(t: float, kind: int, a: object, b: object = None, c: object = None) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(heap, (t, seq, kind, a, b, c))

    # --- prefill state ---
    pre = fleet.prefill
    busy = [False] * len(pre)
    carry: list[tuple[int, int] | None] = [None] * len(pre)  # (request, tokens done) of a chunked prompt
    queue: deque[int] = deque()
    nxt = 0  # next arrival not yet in `queue`
    batches = 0

    def start_prefill(j: int, t: float) -> None:
        nonlocal nxt, batches
        if nxt < n and arr_l[nxt] <= t:
            upto = bisect_right(arr_l, t, nxt)
            queue.extend(range(nxt, upto))
            nxt = upto
        inst = pre[j]
        room, tokens, longest, weighted = inst.budget, 0, 0, 0.0
        done: list[int] = []
        c = carry[j]
        if c is not None:
            r, did = c
            take = min(inp[r] - did, inst.piece, room)
            # a piece's causal mean context is did + take / 2: cost it as a prompt of twice that
            weighted += take * (2 * did + take)
            tokens, longest, room = take, take, room - take
            if did + take == inp[r]:
                done.append(r)
                carry[j] = c = None
            else:
                carry[j] = (r, did + take)
        while queue and room > 0 and c is None:
            r = queue[0]
            length = inp[r]
            if length <= room and length <= inst.piece:
                queue.popleft()
                done.append(r)
                weighted += length * length
                tokens += length
                room -= length
                longest = max(longest, length)
                continue
            if not chunked and tokens > 0 and length <= inst.piece:
                break  # unchunked: the prompt waits for a batch with room for all of it
            take = min(length, inst.piece, room)
            queue.popleft()
            carry[j] = c = (r, take)
            weighted += take * take
            tokens += take
            longest = max(longest, take)
            room -= take
        if tokens == 0:
            busy[j] = False
            return
        ms, kv_ms = inst.batch_ms(shape, topo, tokens, longest, weighted / tokens)
        busy[j] = True
        batches += 1
        push(t + ms / 1e3, _PREFILL_DONE, j, done, kv_ms / 1e3)

    # --- decode state ---
    dec = fleet.decode
    active = [0] * len(dec)
    pending: list[deque[int]] = [deque() for _ in dec]
    stepno = [0] * len(dec)
    dbusy = [False] * len(dec)
    leaving: list[dict[int, list[int]]] = [{} for _ in dec]
    sum_inp = [0] * len(dec)
    sum_admit = [0] * len(dec)
    kv_used = [0] * len(dec)
    admitted_at = [0] * n
    step_end: list[float] = []
    step_tokens: list[float] = []
    per_step = 1.0 + accept

    def start_step(k: int, t: float) -> None:
        inst = dec[k]
        q = pending[k]
        # admit at the step boundary: the plan's batch, then KV memory (an empty instance takes one anyway)
        while q and active[k] < inst.cap and (kv_used[k] + inp[q[0]] + out[q[0]] <= inst.kv_budget or not active[k]):
            r = q.popleft()
            active[k] += 1
            sum_inp[k] += inp[r]
            sum_admit[k] += stepno[k]
            admitted_at[r] = stepno[k]
            kv_used[k] += inp[r] + out[r]
            leaving[k].setdefault(stepno[k] + need[r], []).append(r)
        a = active[k]
        if a == 0:
            dbusy[k] = False
            return
        ctx = (sum_inp[k] + per_step * (a * stepno[k] - sum_admit[k])) / a + 1.0
        ms = inst.step_ms(shape, topo, a, ctx)
        dbusy[k] = True
        end = t + ms / 1e3
        step_end.append(end)
        step_tokens.append(a * per_step)
        push(end, _DECODE_DONE, k)

    # --- samples of the queues ---
    samples: dict[str, list[float]] = {"t": [], "prefill_queue": [], "decode_queue": [], "decode_active": [],
                                       "prefill_busy": []}
    next_sample = 0.0

    def record(s: float) -> None:
        samples["t"].append(s)
        samples["prefill_queue"].append(len(queue) + bisect_right(arr_l, s, nxt) - nxt
                                        + sum(c is not None for c in carry))
        samples["decode_queue"].append(sum(len(q) for q in pending))
        samples["decode_active"].append(sum(active))
        samples["prefill_busy"].append(sum(busy))

    now = 0.0
    while True:
        te = heap[0][0] if heap else math.inf
        ta = arr_l[nxt] if nxt < n and not all(busy) else math.inf
        t = min(ta, te)
        if t == math.inf or t > horizon:
            break
        now = t
        while next_sample <= t:
            record(next_sample)
            next_sample += sample_every
        if ta <= te:
            start_prefill(busy.index(False), ta)
            continue
        _, _, kind, a, b, c = heapq.heappop(heap)
        if kind == _DECODE_DONE:
            k = a
            stepno[k] += 1
            for r in leaving[k].pop(stepno[k], ()):
                fin[r] = t
                active[k] -= 1
                sum_inp[k] -= inp[r]
                sum_admit[k] -= admitted_at[r]
                kv_used[k] -= inp[r] + out[r]
            start_step(k, t)
        elif kind == _PREFILL_DONE:
            arrive: list[int] = []
            for r in b:
                first[r] = t + c
                if need[r] == 0:
                    fin[r] = t + c
                else:
                    arrive.append(r)
            if arrive:
                push(t + c, _KV_ARRIVE, arrive)
            start_prefill(a, t)
        else:
            touched = set()
            for r in a:
                k = min(range(len(dec)), key=lambda i: (active[i] + len(pending[i]), i))
                pending[k].append(r)
                touched.add(k)
            for k in sorted(touched):
                if not dbusy[k]:
                    start_step(k, t)
    return Outcome(reqs, np.array(first), np.array(fin), samples, np.array(step_end), np.array(step_tokens),
                   batches, now)
