"""Plain-data summaries of a plan shared by the text, DOT and HTML views (and by `podplan diff`)."""

from __future__ import annotations

from dataclasses import dataclass

from costmodels.aggregated import AggregatedDeployment
from costmodels.serving import DecodeDeployment
from planner.ir.plan import ExpertPlacement, FrontierPoint, Instance, Plan, Stage, device_ranges

# Display order of step stages; others follow alphabetically.
STAGE_ORDER = ("attention", "gate", "dispatch", "experts", "combine", "shared_experts")


def human_count(n: float) -> str:
    """1234567 -> '1.2M' (parameters, FLOPs)."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KB' (decimal units, as link bandwidths are quoted)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def num(x: float | None, digits: int = 4) -> str:
    """A number for a table: '-' for None, `digits` significant digits, thousands kept whole."""
    if x is None:
        return "-"
    if abs(x) < 1e-9:  # float noise from subtractions (an overlap of 3e-15 ms) reads as 0
        return "0"
    if abs(x) >= 10 ** digits:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def phase_label(plan: Plan, phase: str) -> str:
    """A phase as a reader should read it: an aggregated plan records one phase, decode, whose instances
    also run prefill, so it reads 'prefill+decode'."""
    return "prefill+decode" if phase == "decode" and plan.aggregated else phase


def serving_label(plan: Plan) -> str:
    """'aggregated' (prefill chunked into the decode instances' steps) or 'disaggregated' (prefill and decode
    instances)."""
    return "aggregated" if plan.aggregated else "disaggregated"


def prompt_chunk_per_device(plan: Plan, inst: Instance) -> float:
    """Prompt tokens an aggregated instance computes per device and step beside its decode batch: the
    chunk that admits requests as fast as decode finishes them (costmodels.aggregated), less the cached prefix."""
    w = plan.workload
    dep = AggregatedDeployment(DecodeDeployment(batch_per_device=inst.batch_per_device, mtp_accept=w.mtp_accept),
                               input_len=w.input_len, output_len=w.output_len, prefix_hit=w.prefix_hit)
    return dep.chunk_tokens_per_device * (1.0 - w.prefix_hit)


def is_aggregated_point(point: FrontierPoint) -> bool:
    """A frontier point of an aggregated instance (its instances also run prefill). The point records its
    configuration only as the search's one-line summary, which names the mode first."""
    return point.config.startswith("aggregated ")


def stage_names(breakdown: dict[str, float]) -> list[str]:
    known = [s for s in STAGE_ORDER if s in breakdown]
    return known + sorted(k for k in breakdown if k not in STAGE_ORDER)


def instance_row(phase: str, inst: Instance, placement: ExpertPlacement) -> dict:
    """One deployment table row."""
    af = inst.af_ratio
    return {
        "phase": phase,
        "instance": inst.id,
        "mode": inst.mode,
        "devices": len(inst.devices),
        "device_ids": device_ranges(inst.devices),
        "attention": device_ranges(inst.attention_devices),
        "experts": device_ranges(inst.expert_devices),
        "dp_tp": f"{inst.attention_dp}x{inst.attention_tp}",
        "ep": inst.ep,
        "af": f"{len(inst.attention_devices)}:{len(inst.expert_devices)}" if af is not None else "-",
        "dp_domains": inst.dp_domains,
        "microbatches": inst.microbatches,
        "batch_per_device": inst.batch_per_device,
        "slots_per_device": placement.slots_per_device,
    }


def hardware_label(plan: Plan) -> str:
    """'384 x Ascend 910C', or per group on a mixed topology: '64 x H100 SXM + 64 x H200 SXM'."""
    t = plan.topology
    if not t.groups:
        return f"{t.num_devices} x {t.hardware}"
    return " + ".join(f"{g.num_devices} x {g.hardware}" for g in t.groups)


def instance_hardware(plan: Plan, inst: Instance) -> str | None:
    """'H200 SXM (h200-cluster:8)' for an instance of a mixed topology; None when all devices are one kind."""
    if not plan.topology.groups:
        return None
    return f"{plan.topology.hardware_of(inst.devices[0])} ({inst.group})"


def deployment_rows(plan: Plan) -> list[dict]:
    """Instance rows; an aggregated instance's row also carries its prompt chunk per device and step, and an
    instance of a mixed topology its hardware group."""
    return [dict(instance_row(phase, inst, plan.placement_of(phase, inst)), phase_label=phase_label(plan, phase),
                 chunk_per_device=prompt_chunk_per_device(plan, inst) if plan.aggregated else None,
                 hardware=instance_hardware(plan, inst))
            for phase, inst in plan.instances()]


@dataclass(frozen=True)
class BalanceStats:
    """Expert balance of one placement: max/mean device load per layer, and replicas doubled on a device."""

    phase: str
    index: int
    used_by: tuple[str, ...]
    slots: int
    slots_per_device: int
    algorithm: str
    weighted: bool
    mean_balance: float | None  # mean over layers of max/mean
    worst_balance: float | None
    worst_layer: int | None
    replicas: int  # redundant slots (slots - experts)
    doubled: int  # (layer, device) pairs holding one expert twice


def balance_stats(plan: Plan) -> list[BalanceStats]:
    out = []
    for phase, ph in plan.phases.items():
        for k, placement in enumerate(ph.experts):
            users = tuple(inst.id for inst in ph.instances if inst.experts == k)
            balances = [(lp.balance, lp.layer) for lp in placement.layers if lp.balance is not None]
            spd = placement.slots_per_device
            doubled = 0
            for lp in placement.layers:
                for d in range(placement.devices):
                    held = lp.phy2log[d * spd:(d + 1) * spd]
                    doubled += len(held) - len(set(held))
            worst = max(balances) if balances else (None, None)
            out.append(BalanceStats(
                phase=phase, index=k, used_by=users, slots=placement.slots, slots_per_device=spd,
                algorithm=placement.algorithm or "-", weighted=placement.weighted,
                mean_balance=sum(b for b, _ in balances) / len(balances) if balances else None,
                worst_balance=worst[0], worst_layer=worst[1],
                replicas=placement.slots - plan.model.num_routed_experts, doubled=doubled,
            ))
    return out


def device_counts(plan: Plan) -> dict[str, int]:
    """Devices per phase, in both phases (a prefill/decode-shared device), and idle."""
    per = {name: set(ph.devices) for name, ph in plan.phases.items()}
    used = set().union(*per.values()) if per else set()
    counts = {phase_label(plan, name): len(ds) for name, ds in per.items()}
    if len(per) == 2:
        counts["in both phases"] = len(per["prefill"] & per["decode"])
    counts["idle"] = plan.topology.num_devices - len(used)
    return counts


@dataclass(frozen=True)
class LayerStages:
    """One decoder layer's stages (attention first, then its FFN side) and the traffic around them.

    attention_to_ffn: bytes/token the layer's attention stage sends to its FFN-side stages;
    ffn_to_next: bytes/token the FFN-side stages send on to later stages (the next layer, the head);
    both BF16 and INT8, summed from the stages' measured inputs.
    """

    layer: int
    stages: tuple[Stage, ...]
    attention_to_ffn: float
    ffn_to_next: float
    attention_to_ffn_int8: float
    ffn_to_next_int8: float

    @property
    def kind(self) -> str:
        """'moe' when the layer has a routed_experts stage, else 'dense'."""
        return "moe" if any(st.kind == "routed_experts" for st in self.stages) else "dense"

    @property
    def attention(self) -> Stage:
        return self.stages[0]

    @property
    def ffn(self) -> tuple[Stage, ...]:
        return self.stages[1:]

    @property
    def params(self) -> int:
        return sum(st.params for st in self.stages)

    @property
    def flops_per_token(self) -> float:
        return sum(st.flops_per_token for st in self.stages)

    def signature(self) -> tuple:
        """What must repeat for consecutive layers to be drawn once: every stage's params, FLOPs to 3
        significant digits, bytes out, and the inputs it takes from its own layer.

        Inputs from the layer before depend on that layer, and so do a few FLOPs: the residual adds
        that close a layer run in the next layer's attention stage, so the first MoE layer after a dense
        one differs from the rest by a hidden-size add (7K of DeepSeek-V3's 380M attention FLOPs).
        """
        own = {st.name: st.kind for st in self.stages}
        return tuple(
            (st.kind, st.params, st.weight_bytes, float(f"{st.flops_per_token:.3g}"), st.bytes_out_per_token,
             st.bytes_out_per_token_int8,
             tuple((own[i.src], i.kinds, i.bytes_per_token, i.bytes_per_token_int8) for i in st.inputs if i.src in own))
            for st in self.stages
        )


def layer_stages(stages: tuple[Stage, ...]) -> list[LayerStages]:
    """The decoder layers of a stage table, in layer order (embed and head left out)."""
    by_layer: dict[int, list[Stage]] = {}
    for st in stages:
        if st.layer is not None:
            by_layer.setdefault(st.layer, []).append(st)
    out = []
    for layer in sorted(by_layer):
        group = by_layer[layer]
        attention = next(st for st in group if st.kind == "attention")
        ffn = [st for st in group if st.kind != "attention"]
        ffn_names = {st.name for st in ffn}
        to_ffn = [i for st in ffn for i in st.inputs if i.src == attention.name]
        inside = [i for st in ffn for i in st.inputs if i.src in ffn_names]  # e.g. gate -> routed experts
        out.append(LayerStages(
            layer=layer, stages=(attention, *ffn),
            attention_to_ffn=sum(i.bytes_per_token for i in to_ffn),
            ffn_to_next=sum(st.bytes_out_per_token for st in ffn) - sum(i.bytes_per_token for i in inside),
            attention_to_ffn_int8=sum(i.bytes_per_token_int8 for i in to_ffn),
            ffn_to_next_int8=sum(st.bytes_out_per_token_int8 for st in ffn) - sum(i.bytes_per_token_int8 for i in inside),
        ))
    return out


@dataclass(frozen=True)
class StageGroup:
    """Consecutive decoder layers with identical stages, drawn once ('layers 3-60 x58')."""

    first: int
    last: int
    layer: LayerStages  # the first layer of the group

    @property
    def count(self) -> int:
        return self.last - self.first + 1

    @property
    def label(self) -> str:
        span = f"layer {self.first}" if self.count == 1 else f"layers {self.first}-{self.last}"
        return f"{span} x{self.count}" if self.count > 1 else span


def stage_groups(plan: Plan) -> list[StageGroup]:
    groups: list[StageGroup] = []
    for ls in layer_stages(plan.stages):
        if groups and groups[-1].layer.signature() == ls.signature() and groups[-1].last == ls.layer - 1:
            groups[-1] = StageGroup(groups[-1].first, ls.layer, groups[-1].layer)
        else:
            groups.append(StageGroup(ls.layer, ls.layer, ls))
    return groups


def stage_named(plan: Plan, name: str) -> Stage:
    return next(st for st in plan.stages if st.name == name)


FFN_NAMES = {"moe_gate": "router", "shared_experts": "shared", "dense_ffn": "dense FFN"}


def ffn_label(layer: LayerStages, experts: int) -> str:
    """'dense FFN' or 'MoE: router, 256 experts, shared'."""
    if layer.kind == "dense":
        return "dense FFN"
    return "MoE: " + ", ".join(stage_label(st.kind, experts) for st in layer.ffn)


def stage_label(kind: str, experts: int) -> str:
    """A stage kind as drawn: 'attention', 'router', '256 experts', 'shared', 'dense FFN'."""
    return dict(FFN_NAMES, routed_experts=f"{experts} experts").get(kind, kind.replace("_", " "))


def slo_status(plan: Plan) -> dict[str, str]:
    """'ok' / 'miss' / '' per predicted metric against the workload's SLOs."""
    w = plan.workload
    out = {}
    if plan.decode is not None and w.tpot_slo_ms is not None and plan.decode.predictions.tpot_ms is not None:
        out["tpot"] = "ok" if plan.decode.predictions.tpot_ms <= w.tpot_slo_ms else "miss"
    # TTFT is the prefill phase's, or an aggregated plan's decode phase's (its instances run the prompts)
    first = plan.prefill or plan.decode
    if first is not None and w.ttft_slo_ms is not None and first.predictions.ttft_ms is not None:
        out["ttft"] = "ok" if first.predictions.ttft_ms <= w.ttft_slo_ms else "miss"
    return out


# What each serving mode means, for the row a view shows it in.
MODE_NAMES = {"agg": "aggregated (chunked prefill)", "disagg": "disaggregated prefill/decode"}


def serving_mode_rows(plan: Plan) -> list[dict]:
    """The search record's modes as display strings, the chosen one first ([] for a plan without one)."""
    if plan.search is None:
        return []
    rows = []
    for m in plan.search.modes:
        mode = m.mode + (" (chosen)" if m.chosen else "")
        if m.refused:
            rows.append({"mode": mode, "meaning": MODE_NAMES[m.mode], "chosen": False, "req_s": "-", "tput": "-",
                         "devices": "-", "tpot": "-", "ttft": "-", "config": f"refused: {m.refused}"})
            continue
        rows.append({"mode": mode, "meaning": MODE_NAMES[m.mode], "chosen": m.chosen,
                     "req_s": f"{m.requests_per_s:,.2f}", "tput": f"{m.output_tokens_per_s_per_device:,.0f}",
                     "devices": f"{m.devices} of {plan.search.devices}", "tpot": num(m.tpot_ms, 3),
                     "ttft": "-" if m.ttft_ms is None else f"{m.ttft_ms:,.0f}", "config": m.config})
    return rows


def search_notes(plan: Plan) -> list[str]:
    """Why the chosen mode won, then the search's notes (idle devices, a re-search)."""
    if plan.search is None:
        return []
    return [f"chosen {plan.search.chosen.mode}: {plan.search.why}", *plan.search.notes]
