"""The plan's stage table: the stage-split pass pipeline's stages and measured cuts as Plan IR records.

`podplan compile` and `podplan trace` both read stage facts from here, so a pass added to the
pipeline changes what they show; nothing re-derives a stage's params, FLOPs or bytes by formula.
"""

from __future__ import annotations

from dataclasses import dataclass

from costmodels.model_shape import ModelShape
from planner.frontend.stages import TRAFFIC_KINDS, StagedProgram, compile_stages, stage_rows
from planner.frontend.trace import Traced
from planner.ir import plan as ir

# The signature the compiler traces: one 128-token prompt (the attention FLOPs per token depend on
# it through the causal mean KV length; every other stage fact is per token and does not).
BATCH = 1
SEQ = 128


@dataclass(frozen=True)
class StageTable:
    """What the pipeline produced, in the plan's terms."""

    stages: tuple[ir.Stage, ...]
    passes: tuple[str, ...]  # in the order they ran
    program: StagedProgram


def stage_table(traced: Traced, shape: ModelShape, batch: int = BATCH, seq: int = SEQ) -> StageTable:
    """Run the registered stage-split pipeline (passes.PIPELINES) through the PassManager."""
    program = compile_stages(traced, shape, batch, seq)
    return StageTable(plan_stages(program), tuple(r.name for r in program.records), program)


def plan_stages(program: StagedProgram) -> tuple[ir.Stage, ...]:
    """One ir.Stage per stage of the staged program, in program order, with its inputs by producer."""
    rows = stage_rows(program)
    order = {row["stage"]: i for i, row in enumerate(rows)}
    # (dst, src) -> [kinds, bf16, int8], summed over the values crossing that edge
    edges: dict[tuple[str, str], list] = {}
    for cut in program.cuts:
        if cut.kind not in TRAFFIC_KINDS:
            continue
        edge = edges.setdefault((cut.dst, cut.src), [set(), 0.0, 0.0])
        edge[0].add(cut.kind)
        edge[1] += cut.bytes_bf16
        edge[2] += cut.bytes_int8
    inputs: dict[str, list[ir.StageInput]] = {}
    for (dst, src), (kinds, bf16, int8) in sorted(edges.items(), key=lambda e: (order[e[0][0]], order[e[0][1]])):
        inputs.setdefault(dst, []).append(ir.StageInput(src=src, kinds=tuple(sorted(kinds)), bytes_per_token=bf16,
                                                        bytes_per_token_int8=int8))
    out_bf16: dict[str, float] = {}
    out_int8: dict[str, float] = {}
    for ins in inputs.values():
        for i in ins:
            out_bf16[i.src] = out_bf16.get(i.src, 0.0) + i.bytes_per_token
            out_int8[i.src] = out_int8.get(i.src, 0.0) + i.bytes_per_token_int8
    stages = []
    for row in rows:
        name = row["stage"]
        ins = tuple(inputs.get(name, ()))
        stages.append(ir.Stage(
            name=name, layer=row["layer"], kind=row["kind"], params=row["params"], weight_bytes=row["weight_bytes"],
            flops_per_token=row["flops_per_token"],
            bytes_in_per_token=sum(i.bytes_per_token for i in ins),
            bytes_out_per_token=out_bf16.get(name, 0.0),
            bytes_in_per_token_int8=sum(i.bytes_per_token_int8 for i in ins),
            bytes_out_per_token_int8=out_int8.get(name, 0.0),
            inputs=ins,
        ))
    return tuple(stages)
