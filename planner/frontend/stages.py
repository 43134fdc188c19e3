"""The staged program: compile a traced model through the stage-split pipeline, tabulate its stages,
and run it stage by stage with the routed experts spread over any partition of expert ids.

This is also the model loader's staged-program API for the runtime (`runtime/` reads only
planner.ir and planner.frontend): `staged_program` compiles the program a run's workers execute
(shipped to them as JSON by `planner.frontend.program_io`, never re-traced in a worker), and the
helpers under "for the runtime" name a program's stage calls, the operands of a routed-experts
stage and a rank's shard of it, and the KV cache the program's attention stages take.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from costmodels.errors import InputError
from costmodels.model_shape import ModelShape
from passes import get_pipeline, meta
from passes.context import PassContext
from passes.expert_decompose import ExpertShard, shard_stage
from passes.graphs import PAST_KEY_VALUES, PAST_LEN, KVCache, new_kv_cache
from passes.manager import PassManager, PassRecord
from passes.microbatch import MicrobatchSchedule
from planner.frontend.errors import ConfigError
from planner.frontend.shape import shape_from_traced
from planner.frontend.trace import Traced

# Re-exported for the runtime: a stage's key ((decoder layer, kind); `name` is its submodule,
# 'layer3_attention'), and what the kv-cache pass makes graph inputs: PAST_LEN (positions already
# cached) and PAST_KEY_VALUES (a KVCache, which every attention stage appends its layer to).
StageKey = meta.StageKey

PIPELINE = "stage-split"
# Cut kinds that are stage-to-stage traffic; context (recomputable), scalars, the cache and the
# program input are listed in the cuts but not counted in a stage's bytes in / out.
TRAFFIC_KINDS = ("hidden", "routing_ids", "routing_weights", "expert_out", "shared_out", "ffn_out", "residual")


@dataclass
class StagedProgram:
    """The output of the stage-split pipeline for one model and (batch, seq, past) signature."""

    gm: fx.GraphModule
    shape: ModelShape
    ctx: PassContext
    records: tuple[PassRecord, ...] = field(default=())

    @property
    def stages(self) -> list[meta.StageKey]:
        return [meta.stage_key_of(n) for n in self.gm.graph.nodes if n.op == "call_module"]

    @property
    def cuts(self) -> tuple[meta.CutTensor, ...]:
        return meta.graph_meta(self.gm, meta.CUTS)

    @property
    def schedule(self) -> MicrobatchSchedule:
        return meta.graph_meta(self.gm, meta.SCHEDULE)

    @property
    def phases(self) -> tuple[meta.PhaseSignature, ...]:
        return meta.graph_meta(self.gm, meta.PHASES)

    @property
    def experts(self) -> dict[str, meta.ExpertWeights]:
        return meta.graph_meta(self.gm, meta.EXPERTS)


def compile_stages(
    traced: Traced,
    shape: ModelShape,
    batch: int = 1,
    seq: int = 128,
    past: int = 0,
    *,
    options: dict | None = None,
    dump_after: str | None = None,
    dump: Callable[[str], None] = print,
) -> StagedProgram:
    """Run the stage-split pipeline on a traced model; the traced graph is left unchanged."""
    if batch <= 0 or seq <= 0 or past < 0:
        raise InputError(f"signature batch={batch}, seq={seq}, past={past}: batch and seq must be positive, past >= 0")
    ctx = PassContext(shape=shape, batch=batch, seq=seq, past=past, options=dict(options or {}))
    manager = PassManager(get_pipeline(PIPELINE), dump_after=dump_after, dump=dump)
    gm = manager.run(traced.gm, ctx)
    return StagedProgram(gm=gm, shape=shape, ctx=ctx, records=tuple(manager.records))


def stage_rows(program: StagedProgram) -> list[dict]:
    """One row per stage in program order: layer, kind, params, FLOPs/token, cut bytes/token in and out.

    Bytes are BF16 (`_int8` keys: INT8 activations) with top-k fan-out, summed over TRAFFIC_KINDS;
    `cut_in` / `cut_out` break the BF16 bytes down by kind.
    """
    rows = []
    for node in program.gm.graph.nodes:
        if node.op != "call_module":
            continue
        key = meta.stage_key_of(node)
        cost = meta.cost_of(node)
        ins = [c for c in program.cuts if c.dst == key.name and c.kind in TRAFFIC_KINDS]
        outs = [c for c in program.cuts if c.src == key.name and c.kind in TRAFFIC_KINDS]
        rows.append({
            "stage": key.name,
            "layer": key.layer,
            "kind": key.kind,
            "params": cost.params,
            "weight_bytes": cost.weight_bytes,
            "flops_per_token": round(cost.flops_per_token, 1),
            "cut_in_bytes_per_token": round(sum(c.bytes_bf16 for c in ins), 1),
            "cut_out_bytes_per_token": round(sum(c.bytes_bf16 for c in outs), 1),
            "cut_in_bytes_per_token_int8": round(sum(c.bytes_int8 for c in ins), 1),
            "cut_out_bytes_per_token_int8": round(sum(c.bytes_int8 for c in outs), 1),
            "cut_in": _by_kind(ins),
            "cut_out": _by_kind(outs),
        })
    return rows


def _by_kind(cuts: list[meta.CutTensor]) -> dict[str, float]:
    out: dict[str, float] = {}
    for c in cuts:
        out[c.kind] = round(out.get(c.kind, 0.0) + c.bytes_bf16, 1)
    return out


def stage_counts(program: StagedProgram) -> dict[str, int]:
    counts = Counter(key.kind for key in program.stages)
    return {kind: counts[kind] for kind in meta.STAGE_KINDS if counts[kind]}


def stage_document(program: StagedProgram) -> dict:
    """The JSON form of `podplan trace MODEL --stages --json` (deterministic: no timings)."""
    return {
        "model": program.shape.name,
        "signature": {"batch": program.ctx.batch, "seq": program.ctx.seq, "past": program.ctx.past},
        "pipeline": list(get_pipeline(PIPELINE)),
        "stage_counts": stage_counts(program),
        "stages": stage_rows(program),
        "cuts": [
            {"src": c.src, "dst": c.dst, "value": c.value, "kind": c.kind, "shapes": [list(s) for s in c.shapes],
             "dtype": c.dtype, "fanout": c.fanout, "bytes_bf16": c.bytes_bf16, "bytes_int8": c.bytes_int8}
            for c in program.cuts
        ],
        "phases": [
            {"phase": p.phase, "batch": p.batch, "seq": p.seq, "past": p.past} for p in program.phases
        ],
        "microbatch_schedule": program.schedule.format(),
    }


# --- running the staged program ------------------------------------------------------------------


def check_partition(groups: Sequence[Sequence[int]], num_experts: int) -> list[tuple[int, ...]]:
    """`groups` must split 0..num_experts-1 into non-empty disjoint groups (one per device)."""
    seen: dict[int, int] = {}
    for g, group in enumerate(groups):
        if not group:
            raise InputError(f"expert partition: group {g} is empty; every device hosts at least one expert")
        for e in group:
            if not 0 <= e < num_experts:
                raise InputError(f"expert partition: expert {e} in group {g} is out of range 0..{num_experts - 1}")
            if e in seen:
                raise InputError(f"expert partition: expert {e} is in groups {seen[e]} and {g}; groups must be disjoint")
            seen[e] = g
    missing = sorted(set(range(num_experts)) - set(seen))
    if missing:
        raise InputError(f"expert partition: experts {missing[:8]} are hosted nowhere; cover 0..{num_experts - 1}")
    return [tuple(sorted(g)) for g in groups]


class StageInterpreter(fx.Interpreter):
    """Runs a staged program one stage call at a time.

    A routed_experts stage runs once per expert group (each a stage copy hosting only that group's
    experts) and the group outputs are summed: the combine step of expert parallelism.
    """

    def __init__(self, program: StagedProgram, expert_groups: Sequence[Sequence[int]] | None = None):
        super().__init__(program.gm)
        self.shards: dict[str, list[fx.GraphModule]] = {}
        if expert_groups is None:
            return
        for name, weights in program.experts.items():
            groups = check_partition(expert_groups, weights.num_experts)
            stage = program.gm.get_submodule(name)
            assert isinstance(stage, fx.GraphModule), f"stage {name}: the pass manager's staged lint checks this"
            self.shards[name] = [shard_stage(stage, ids) for ids in groups]

    def call_module(self, target, args, kwargs):
        shards = self.shards.get(str(target))
        if shards is None:
            return super().call_module(target, args, kwargs)
        outputs = [shard(*args, **kwargs) for shard in shards]
        return tuple(sum(parts[1:], parts[0]) for parts in zip(*outputs))


def run_staged(
    program: StagedProgram,
    input_ids: torch.Tensor,
    *,
    past_len: int = 0,
    cache=None,
    expert_groups: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """Logits of the staged program; pass `cache` (e.g. passes.graphs.new_kv_cache()) to prefill/decode."""
    with torch.no_grad():
        return StageInterpreter(program, expert_groups).run(input_ids, past_len, cache)


# --- for the runtime: load a program, find its stages, shard its experts ---------------------------

# The signature a worker compiles at: its numbers (stage costs, phase shapes) are not used to run,
# and the graph is shape-generic, so the smallest one keeps the passes' example runs cheap.
_LOAD_BATCH, _LOAD_SEQ = 1, 2


def staged_program(traced: Traced) -> StagedProgram:
    """The registered stage-split pipeline on a traced model (any device), at a minimal signature."""
    return compile_stages(traced, shape_from_traced(traced), _LOAD_BATCH, _LOAD_SEQ)


def stage_calls(program: StagedProgram) -> list[tuple[fx.Node, meta.StageKey]]:
    """(top-level call node, stage) for every stage call, in program order."""
    return [(n, meta.stage_key_of(n)) for n in program.gm.graph.nodes if n.op == "call_module"]


def stage_module(program: StagedProgram, name: str) -> fx.GraphModule:
    stage = program.gm.get_submodule(name)
    assert isinstance(stage, fx.GraphModule), f"stage {name}: the pass manager's staged lint checks this"
    return stage


def _io(stage: fx.GraphModule) -> tuple[list[fx.Node], list]:
    placeholders = [n for n in stage.graph.nodes if n.op == "placeholder"]
    outputs = stage.graph.output_node().args[0]
    return placeholders, list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]


def routed_operands(program: StagedProgram, name: str) -> tuple[int, int, int]:
    """Positions of (hidden rows [T, H], top-k ids [T, k], top-k weights [T, k]) among the inputs of
    routed-experts stage `name`.

    Expert parallelism sends rows and sums what comes back, so the stage must be its experts module
    alone: three inputs straight into it, its output the stage's only one. ConfigError otherwise.
    """
    stage = stage_module(program, name)
    placeholders, outputs = _io(stage)
    experts = [n for n in stage.graph.nodes if n.op == "call_module" and meta.role_of(n) == "routed_experts"]
    node = experts[0] if len(experts) == 1 else None
    if (node is None or len(node.args) != 3 or node.kwargs or outputs != [node]
            or any(a not in placeholders for a in node.args) or len(placeholders) != 3):
        raise ConfigError(f"stage {name}: a routed-experts stage must be one experts module called on its three "
                          "inputs (hidden, top-k ids, top-k weights) and nothing else; a pass changed it into "
                          "one the expert exchange cannot split")
    pos = [placeholders.index(a) for a in node.args]
    return pos[0], pos[1], pos[2]


def single_input_stage(program: StagedProgram, name: str) -> bool:
    """True when stage `name` takes one input and returns one output (it can run on rows elsewhere)."""
    placeholders, outputs = _io(stage_module(program, name))
    return len(placeholders) == 1 and len(outputs) == 1


def expert_shard(program: StagedProgram, name: str, hosted: Sequence[int], *, release: bool = False) -> fx.GraphModule:
    """Routed-experts stage `name` holding only experts `hosted` (global ids; repeats count once).

    Called as the stage is, on (hidden, ids, weights) with global ids. With `release` the layer's
    full expert weights are freed at once (unless the shard hosts them all), so a rank peaks at one
    model plus one layer's share; the program's own copy of the stage cannot run after that.
    """
    stage = stage_module(program, name)
    shard = shard_stage(stage, hosted)
    full = next(m for m in stage.modules() if isinstance(m, ExpertShard))
    part = next(m for m in shard.modules() if isinstance(m, ExpertShard))
    if release and part.experts is not full.experts:
        # the shard keeps a reference to the unsliced module (to re-select); emptying it frees the
        # weights whoever else holds it (the model, the traced graph, the program)
        for pname, _ in list(full.experts.named_parameters(recurse=False)):
            setattr(full.experts, pname, None)
    return shard


# --- the text table -----------------------------------------------------------------------------


def collapse_rows(rows: list[dict]) -> list[dict]:
    """Merge stages of one kind whose numbers repeat over consecutive layers into one row ('3-59')."""
    keys = ("kind", "params", "flops_per_token", "cut_in_bytes_per_token", "cut_out_bytes_per_token")
    groups: list[dict] = []
    open_by_kind: dict[str, dict] = {}
    for row in rows:
        last = open_by_kind.get(row["kind"])
        if (last is not None and row["layer"] is not None and last["last"] is not None
                and row["layer"] == last["last"] + 1 and all(last[k] == row[k] for k in keys)):
            last["last"] = row["layer"]
            continue
        group = dict(row, first=row["layer"], last=row["layer"])
        groups.append(group)
        open_by_kind[row["kind"]] = group
    for g in groups:
        first, last = g["first"], g["last"]
        g["span"] = "-" if first is None else str(first) if first == last else f"{first}-{last}"
    return groups
