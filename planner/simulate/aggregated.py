"""The event loop of an aggregated plan: every instance runs mixed steps (its decode batch plus a chunk
of prompt tokens), as costmodels.aggregated prices them.

Step 1: arrivals join one FIFO queue; an idle instance starts a step when one arrives.
Step 2: at a step boundary an instance fills its chunk: first the prompts it is part-way through, then
        new prompts from the queue head, each at most one die's share per step (a prompt sits on one
        attention DP rank). A new prompt starts only if a decode slot (the plan's batch) will be free
        when its last piece is done, and its KV fits.
Step 3: the step takes the decode step at the batch's size and mean context plus the chunk's marginal
        cost (costmodels.aggregated.chunk_ms); a prompt whose last piece ran emits its first token at
        the step's end and decodes from the next step.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_right
from collections import deque

import numpy as np

from planner.simulate.engine import Outcome, decode_steps
from planner.simulate.fleet import Fleet
from planner.simulate.workload import Requests


def run_aggregated(fleet: Fleet, reqs: Requests, *, seed: int = 0, horizon: float = math.inf,
                   sample_every: float = 1.0) -> Outcome:
    """Simulate `reqs` on an aggregated `fleet` until every request finished or the clock passes `horizon`."""
    shape, topo = fleet.shape, fleet.topo
    accept = fleet.workload.mtp_accept
    n = len(reqs)
    arr_l = reqs.arrival.tolist()
    inp = reqs.input_len.tolist()
    out = reqs.output_len.tolist()
    need = decode_steps(np.maximum(0, reqs.output_len - 1), accept, np.random.default_rng([seed, 2])).tolist()
    first = [math.nan] * n
    fin = [math.nan] * n
    heap: list[tuple[float, int, int]] = []
    insts = fleet.decode
    chunks = [d.chunks for d in insts]
    assert all(c is not None for c in chunks), "an aggregated fleet's instances all run chunks"
    K = len(insts)
    queue: deque[int] = deque()
    nxt = 0
    busy = [False] * K
    active = [0] * K
    filling: list[list[list[int]]] = [[] for _ in range(K)]  # [request, tokens done] of prompts part-way
    joining: list[list[int]] = [[] for _ in range(K)]  # prompts done at the step now running: decode next step
    stepno = [0] * K
    leaving: list[dict[int, list[int]]] = [{} for _ in range(K)]
    sum_inp = [0] * K
    sum_admit = [0] * K
    kv_used = [0] * K
    admitted_at = [0] * n
    step_end: list[float] = []
    step_tokens: list[float] = []
    per_step = 1.0 + accept
    batches = 0

    def free_by(k: int, steps: int) -> int:
        """Sequences of instance k that leave within the next `steps` steps."""
        return sum(len(leaving[k].get(stepno[k] + s, ())) for s in range(1, steps + 1))

    def start_step(k: int, t: float) -> None:
        nonlocal nxt, batches
        if nxt < n and arr_l[nxt] <= t:
            upto = bisect_right(arr_l, t, nxt)
            queue.extend(range(nxt, upto))
            nxt = upto
        inst, c = insts[k], chunks[k]
        assert c is not None
        # the prompts done last step join the decode batch now
        for r in joining[k]:
            active[k] += 1
            sum_inp[k] += inp[r]
            sum_admit[k] += stepno[k]
            admitted_at[r] = stepno[k]
            leaving[k].setdefault(stepno[k] + need[r], []).append(r)
        joining[k] = []
        room, tokens, done = c.budget, 0, []
        for item in filling[k]:
            take = min(inp[item[0]] - item[1], c.piece, room)
            item[1] += take
            tokens += take
            room -= take
        while queue and room > 0:
            r = queue[0]
            steps = math.ceil(inp[r] / c.piece)
            slots = inst.cap - active[k] - len(filling[k]) + free_by(k, steps)
            if slots <= 0 or (kv_used[k] + inp[r] + out[r] > inst.kv_budget and (active[k] or filling[k])):
                break
            queue.popleft()
            take = min(inp[r], c.piece, room)
            filling[k].append([r, take])
            kv_used[k] += inp[r] + out[r]
            tokens += take
            room -= take
        for item in filling[k]:
            if item[1] == inp[item[0]]:
                done.append(item[0])
        filling[k] = [item for item in filling[k] if item[1] < inp[item[0]]]
        a = active[k]
        if a == 0 and tokens == 0:
            busy[k] = False
            return
        # a step without decoding sequences still pays the fixed costs once: the step of one sequence
        ctx = (sum_inp[k] + per_step * (a * stepno[k] - sum_admit[k])) / a + 1.0 if a else float(fleet.workload.input_len)
        ms = inst.step_ms(shape, topo, max(1, a), ctx) + c.ms(shape, topo, tokens)
        if tokens:
            batches += 1
        busy[k] = True
        end = t + ms / 1e3
        if a:
            step_end.append(end)
            step_tokens.append(a * per_step)
        for r in done:
            first[r] = end
            if need[r] == 0:
                fin[r] = end
                kv_used[k] -= inp[r] + out[r]
            else:
                joining[k].append(r)
        heapq.heappush(heap, (end, k, stepno[k]))

    samples: dict[str, list[float]] = {"t": [], "prefill_queue": [], "decode_queue": [], "decode_active": [],
                                       "prefill_busy": []}
    next_sample = 0.0

    def record(s: float) -> None:
        samples["t"].append(s)
        samples["prefill_queue"].append(len(queue) + bisect_right(arr_l, s, nxt) - nxt
                                        + sum(len(f) for f in filling))
        samples["decode_queue"].append(sum(len(j) for j in joining))
        samples["decode_active"].append(sum(active))
        samples["prefill_busy"].append(sum(bool(f) for f in filling))

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
            # the arrival wakes the idle instance with the fewest sequences
            k = min((i for i in range(K) if not busy[i]), key=lambda i: (active[i] + len(filling[i]), i))
            start_step(k, ta)  # an empty instance always takes the head of the queue
            continue
        _, k, _ = heapq.heappop(heap)
        stepno[k] += 1
        for r in leaving[k].pop(stepno[k], ()):
            fin[r] = t
            active[k] -= 1
            sum_inp[k] -= inp[r]
            sum_admit[k] -= admitted_at[r]
            kv_used[k] -= inp[r] + out[r]
        start_step(k, t)
        for i in range(K):  # a queue an idle instance can take from
            if not busy[i] and queue:
                start_step(i, t)
    return Outcome(reqs, np.array(first), np.array(fin), samples, np.array(step_end), np.array(step_tokens),
                   batches, now)
