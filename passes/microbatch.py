"""microbatch: a tick-by-tick schedule of m microbatches over the staged program.

Stages run on two lanes: the attention side "A" (embed, attention, moe_gate, head) and the expert
side "E" (dense_ffn, routed_experts, shared_experts), as in attention-FFN disaggregation
(MegaScale-Infer, Step-3; see expert-balancing-and-formats.md). While one lane works on
microbatch i, the other works on microbatch i+1: that overlap hides the A<->E transfers.

Algorithm (ctx.options["microbatch"] = {"microbatches": m, "lanes": {kind: "A"|"E"}}):
  Step 1: cut the program (stages in program order) into steps: maximal runs of stages on one lane.
  Step 2: each lane runs its actions (step k, microbatch i) in the order (k, i); at every tick it
          starts its next action if microbatch i finished step k-1 at an earlier tick.
  Step 3: record each tick's actions; stop when every microbatch has run every step.

Compact form (reversible: `MicrobatchSchedule.parse(s.format()) == s`): ticks joined by " | ",
actions in a tick by ",", an action is `MB:STAGE+STAGE...` with stages coded `emb`, `head`, and
`a3` / `g3` / `f3` / `x3` / `s3` for layer 3's attention / moe_gate / dense_ffn / routed_experts /
shared_experts. Worked example (tiny-deepseek-v3, m=2):
  0:emb+a0 | 1:emb+a0,0:f0 | 0:a1+g1,1:f0 | 1:a1+g1,0:x1+s1 | 0:a2+g2,1:x1+s1 | 1:a2+g2,0:x2+s2
  | 0:head,1:x2+s2 | 1:head
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch.fx as fx

from costmodels.errors import InputError
from passes import meta
from passes.context import PassContext
from passes.graphs import copy_module, stage_calls

NAME = "microbatch"
NEEDS = (meta.STAGED,)
PROVIDES = (meta.SCHEDULE,)

DEFAULT_LANES = {
    "embed": "A", "attention": "A", "moe_gate": "A", "head": "A",
    "dense_ffn": "E", "routed_experts": "E", "shared_experts": "E",
}
_CODE = {"attention": "a", "moe_gate": "g", "dense_ffn": "f", "routed_experts": "x", "shared_experts": "s"}
_KIND = {v: k for k, v in _CODE.items()}
_ACTION = re.compile(r"^(\d+):([a-z0-9+]+)$")
_STAGE = re.compile(r"^(emb|head|([agfxs])(\d+))$")


def stage_code(key: meta.StageKey) -> str:
    if key.kind == "embed":
        return "emb"
    if key.kind == "head":
        return "head"
    return f"{_CODE[key.kind]}{key.layer}"


def _parse_stage(code: str, where: str) -> meta.StageKey:
    m = _STAGE.match(code)
    if m is None:
        raise InputError(f"schedule {where}: bad stage code '{code}'; expected emb, head or [agfxs]LAYER (e.g. a3)")
    if m.group(1) == "emb":
        return meta.StageKey(None, "embed")
    if m.group(1) == "head":
        return meta.StageKey(None, "head")
    return meta.StageKey(int(m.group(3)), _KIND[m.group(2)])


@dataclass(frozen=True)
class Action:
    """Microbatch `microbatch` runs `stages` (consecutive in program order, one lane)."""

    microbatch: int
    stages: tuple[meta.StageKey, ...]

    def format(self) -> str:
        return f"{self.microbatch}:" + "+".join(stage_code(s) for s in self.stages)


@dataclass(frozen=True)
class MicrobatchSchedule:
    """ticks[t]: the actions running concurrently at tick t (at most one per lane)."""

    microbatches: int
    ticks: tuple[tuple[Action, ...], ...]

    def format(self) -> str:
        return " | ".join(",".join(a.format() for a in tick) for tick in self.ticks)

    @classmethod
    def parse(cls, text: str) -> MicrobatchSchedule:
        """Inverse of `format`; fails with the tick and action it cannot read."""
        ticks = []
        for t, chunk in enumerate(text.split("|")):
            actions = []
            for item in chunk.strip().split(","):
                m = _ACTION.match(item.strip())
                if m is None:
                    raise InputError(f"schedule tick {t}: bad action '{item.strip()}'; expected MB:STAGE[+STAGE...] (e.g. 0:a3+g3)")
                stages = tuple(_parse_stage(c, f"tick {t}") for c in m.group(2).split("+"))
                actions.append(Action(int(m.group(1)), stages))
            ticks.append(tuple(actions))
        count = 1 + max(a.microbatch for tick in ticks for a in tick)
        return cls(count, tuple(ticks))

    def overlaps(self) -> list[tuple[Action, Action]]:
        """Pairs of actions of different microbatches that run in the same tick."""
        return [(a, b) for tick in self.ticks for i, a in enumerate(tick) for b in tick[i + 1:]]


def build_schedule(stages: list[meta.StageKey], microbatches: int, lanes: dict[str, str]) -> MicrobatchSchedule:
    """The list schedule of Steps 1-3 for `stages` in program order."""
    # Step 1: steps = maximal same-lane runs
    steps: list[tuple[str, tuple[meta.StageKey, ...]]] = []
    for key in stages:
        lane = lanes[key.kind]
        if steps and steps[-1][0] == lane:
            steps[-1] = (lane, steps[-1][1] + (key,))
        else:
            steps.append((lane, (key,)))
    # Step 2: per lane, its actions in (step, microbatch) order
    queues = {lane: [(k, i) for k, (ln, _) in enumerate(steps) if ln == lane for i in range(microbatches)]
              for lane in sorted(set(lanes.values()))}
    done_at: dict[tuple[int, int], int] = {}
    ticks: list[tuple[Action, ...]] = []
    while any(queues.values()):
        tick = len(ticks)
        running = []
        for lane in sorted(queues):
            queue = queues[lane]
            if not queue:
                continue
            k, i = queue[0]
            if k == 0 or done_at.get((k - 1, i), tick) < tick:
                running.append((k, i))
                queue.pop(0)
        # Step 3: record (lane order A, E); an action finishes within its tick
        for k, i in running:
            done_at[(k, i)] = tick
        ticks.append(tuple(Action(i, steps[k][1]) for k, i in running))
    return MicrobatchSchedule(microbatches, tuple(ticks))


def microbatch(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Record the MicrobatchSchedule of ctx.options['microbatch'] (default 2 microbatches)."""
    opts = ctx.options.get(NAME, {})
    count = int(opts.get("microbatches", 2))
    lanes = {**DEFAULT_LANES, **opts.get("lanes", {})}
    if count < 1:
        raise InputError(f"microbatch: {count} microbatches; use at least 1")
    bad = sorted(k for k, v in lanes.items() if v not in ("A", "E"))
    if bad:
        raise InputError(f"microbatch: lane of '{bad[0]}' must be 'A' (attention side) or 'E' (expert side)")
    out = copy_module(gm)
    stages = [key for _, key in stage_calls(out)]
    out.meta[meta.SCHEDULE] = build_schedule(stages, count, lanes)
    return out
