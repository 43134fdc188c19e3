"""The runtime's execution spec: which rank runs attention, which expert slots, which phases.

`runtime.from_plan` builds it from a Plan; tests build it directly. It is plain JSON (the job file
every worker reads), and `sequences_of` / `microbatches_of` say which prompts each rank owns.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

PHASES = ("prefill", "decode")


@dataclass(frozen=True)
class LayerSlots:
    """Expert placement of one MoE layer: phy2log[s] is the logical expert in physical slot s.

    shares[s]: fraction of expert phy2log[s]'s tokens sent to slot s (each expert's shares sum to 1).
    """

    layer: int
    phy2log: tuple[int, ...]
    shares: tuple[float, ...]


@dataclass(frozen=True)
class InstanceSpec:
    """One serving instance: its ranks by role, its expert placement and its microbatches.

    Slot s lives on expert_ranks[s // slots_per_rank]. shared_ranks compute the shared experts
    (an attention rank among them computes its own; the others send their tokens there).
    """

    name: str
    phases: tuple[str, ...]  # ("prefill", "decode"), ("prefill",) or ("decode",)
    attention_ranks: tuple[int, ...]
    expert_ranks: tuple[int, ...]
    slots_per_rank: int
    layers: tuple[LayerSlots, ...]  # one per MoE layer, ascending
    microbatches: int = 1
    shared_ranks: tuple[int, ...] = ()

    @property
    def ranks(self) -> tuple[int, ...]:
        """Every rank of the instance, ascending: the members of its process group."""
        return tuple(sorted(set(self.attention_ranks) | set(self.expert_ranks) | set(self.shared_ranks)))

    def slots_of(self, rank: int) -> range:
        """The physical slots rank hosts (empty for attention-only ranks)."""
        if rank not in self.expert_ranks:
            return range(0)
        k = self.expert_ranks.index(rank)
        return range(k * self.slots_per_rank, (k + 1) * self.slots_per_rank)


@dataclass(frozen=True)
class RunSpec:
    """Everything a worker needs: the model, the instances, the requests and the backend."""

    model: str  # bundled name or config path (planner.frontend.zoo.load_source)
    world_size: int
    instances: tuple[InstanceSpec, ...]
    prompts: int = 4
    prompt_len: int = 8
    new_tokens: int = 4
    seed: int = 0
    weights: str | None = None  # safetensors checkpoint; None = seeded random weights
    backend: str = "gloo"
    keep_logits: bool = True  # send every step's logits to rank 0 (False: tokens only, for big vocabularies)
    # static buffers: a preallocated KV cache, positions and sampled tokens on the device, no read-back
    # inside a step; on a GPU, decode steps then replay as one CUDA graph (the NCCL path turns this on)
    static: bool = False
    # fixed-capacity dispatch blocks: None = the worst case (never overflows); else factor x the mean
    capacity_factor: float | None = None
    predictions: dict = field(default_factory=dict)  # the plan's numbers, shown beside the measured ones

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, indent=1)

    @classmethod
    def from_json(cls, text: str) -> RunSpec:
        raw = json.loads(text)
        insts = []
        for inst in raw.pop("instances"):
            layers = tuple(LayerSlots(lp["layer"], tuple(lp["phy2log"]), tuple(lp["shares"])) for lp in inst.pop("layers"))
            insts.append(InstanceSpec(
                name=inst["name"], phases=tuple(inst["phases"]), attention_ranks=tuple(inst["attention_ranks"]),
                expert_ranks=tuple(inst["expert_ranks"]), slots_per_rank=inst["slots_per_rank"], layers=layers,
                microbatches=inst["microbatches"], shared_ranks=tuple(inst["shared_ranks"]),
            ))
        return cls(instances=tuple(insts), **raw)

    def instances_of(self, phase: str) -> list[InstanceSpec]:
        return [inst for inst in self.instances if phase in inst.phases]

    @property
    def disaggregated_pd(self) -> bool:
        """True when prefill and decode run on different instances (KV cache handed over)."""
        return any(inst.phases == ("prefill",) for inst in self.instances)


def split(n: int, parts: int) -> list[range]:
    """n items into `parts` contiguous ranges, the first n % parts one longer."""
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


def sequences_of(spec: RunSpec, phase: str) -> dict[int, list[int]]:
    """Attention rank -> the prompt ids it serves in `phase` (instances, then ranks, in blocks)."""
    insts = spec.instances_of(phase)
    out: dict[int, list[int]] = {}
    for inst, block in zip(insts, split(spec.prompts, len(insts))):
        for rank, sub in zip(inst.attention_ranks, split(len(block), len(inst.attention_ranks))):
            out[rank] = [block[i] for i in sub]
    return out


def microbatches_of(seqs: list[int], m: int) -> list[list[int]]:
    """A rank's sequences cut into m microbatches (some may be empty when seqs < m)."""
    return [[seqs[i] for i in r] for r in split(len(seqs), m)]


def kv_routes(spec: RunSpec) -> list[tuple[int, int, list[int]]]:
    """(prefill rank, decode rank, sequences) for every KV-cache hand-over, sorted by ranks."""
    if not spec.disaggregated_pd:
        return []
    src = {s: r for r, seqs in sequences_of(spec, "prefill").items() for s in seqs}
    dst = {s: r for r, seqs in sequences_of(spec, "decode").items() for s in seqs}
    pairs: dict[tuple[int, int], list[int]] = {}
    for s in range(spec.prompts):
        pairs.setdefault((src[s], dst[s]), []).append(s)
    return [(a, b, pairs[(a, b)]) for a, b in sorted(pairs)]


def steps_of(spec: RunSpec, inst: InstanceSpec) -> list[int]:
    """Generation steps the instance runs: 0 is the prefill, k >= 1 the k-th decode step."""
    steps = [0] if "prefill" in inst.phases else []
    if "decode" in inst.phases:
        steps += list(range(1, spec.new_tokens))
    return steps


def equal_shares(phy2log: tuple[int, ...]) -> tuple[float, ...]:
    """Each expert's tokens split evenly over its replicas."""
    count: dict[int, int] = {}
    for e in phy2log:
        count[e] = count.get(e, 0) + 1
    return tuple(1.0 / count[e] for e in phy2log)


def round_robin(num_experts: int, num_slots: int) -> tuple[int, ...]:
    """Slot s holds expert s % E: every expert once, then replicas of the first ones."""
    return tuple(s % num_experts for s in range(num_slots))


def make_instance(name: str, phases: tuple[str, ...], attention: list[int], experts: list[int], *,
                  num_experts: int, moe_layers: list[int], slots_per_rank: int | None = None,
                  microbatches: int = 1, shared: list[int] | None = None, shares: str = "equal") -> InstanceSpec:
    """An instance with round-robin placement (tests, bench); shares 'equal' or 'skewed' (2:1 over replicas)."""
    spr = slots_per_rank or -(-num_experts // len(experts))
    phy2log = round_robin(num_experts, spr * len(experts))
    if shares == "skewed":
        raw = tuple(2.0 if s < num_experts else 1.0 for s in range(len(phy2log)))
        total: dict[int, float] = {}
        for e, w in zip(phy2log, raw):
            total[e] = total.get(e, 0.0) + w
        share = tuple(w / total[e] for e, w in zip(phy2log, raw))
    else:
        share = equal_shares(phy2log)
    layers = tuple(LayerSlots(layer, phy2log, share) for layer in moe_layers)
    return InstanceSpec(name, phases, tuple(attention), tuple(experts), spr, layers, microbatches,
                        tuple(shared if shared is not None else attention))


def prompts_of(spec: RunSpec, vocab: int):
    """The run's prompts [N, P] int64: seeded, independent of the weight seed's RNG stream."""
    import torch

    gen = torch.Generator().manual_seed(10_000 + spec.seed)
    return torch.randint(0, vocab, (spec.prompts, spec.prompt_len), generator=gen)
