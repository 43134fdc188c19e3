"""Aggregated serving: prefill and decode on the same instances, chunked prefill mixed into decode steps.

This is how SGLang and vLLM run a model when prefill and decode are not disaggregated: every
engine step carries the decode batch (one token per running sequence, plus the MTP draft) and a
chunk of prompt tokens of newly admitted requests. In steady state the chunk admits requests as
fast as the decode batch finishes them, so the chunk size follows from the batch and the
workload:

    chunk tokens per device per step = batch_per_device x tokens per step x input_len / output_len

The step time is built from serving.py's public estimates, not a second model of the hardware:

    step = decode step(batch) + [prefill batch(chunk + decode tokens) - prefill batch(decode tokens)]

The bracket is the chunk's marginal cost: the decode tokens already pay the step's fixed costs (the
weight reads of the experts they touch, collective latency floors), so they are not counted twice;
experts that only the chunk's tokens touch are. It is an approximation (the two halves of a mixed
step do not overlap their compute and memory traffic here; docs/compile.md describes where the
search uses it).

TTFT is the time to feed one prompt through the chunks at the steady-state rate (one prompt on
one die's attention DP rank): ceil(prompt tokens / chunk tokens per die) steps. Queueing is not
modelled, as for disaggregated prefill.

Without chunked prefill (`chunked=False`: TensorRT-LLM's default, `--enable_chunked_context` off;
its DeepSeek-R1 guide also notes MLA chunked context was not supported on Hopper) a prompt runs whole
in one step, and the per-rank token budget `max_num_tokens` fits `c = (max_num_tokens - decode
tokens) // prompt` of them (at least one). Then only a fraction f = chunk / (c x prompt) of the steps
carry prompts, and they carry whole ones, so the mean step is

    step = decode step(batch)
           + f x [prefill batch(c prompts per die + decode tokens) - prefill batch(decode tokens)]

TTFT is one such step.

Whole prompts on attention-DP ranks. Each of the N attention-DP ranks (dies / head-TP) admits its own
prompts, and the MoE layers synchronise the ranks every step, so a step lasts as long as its slowest
rank. TensorRT-LLM's default scheduler does not line the ranks' prompts up: "some ranks may be
processing computationally intensive context phases while others execute generation phases ... the
iteration time is dominated by the slowest rank" (TensorRT-LLM tech blog 10, "ADP Balance Strategy",
which measured a mean per-step balance of 54% and 1.33x from lining them up, DeepSeek-V3 on 8 GB200,
attention DP8 + EP8). With `prompt_sync=False` (that default) each rank carries a prompt in a fraction
f of the steps independently of the others, so a share 1 - (1 - f)^N of the steps waits for some rank's
prompt. What that rank does for its own prompt (attention, dense and shared-expert GEMMs, per-token
work, and sending its tokens through dispatch and combine, which its own links carry) is paid in every
such step; the routed experts' extra GEMM work is spread over the EP ranks and paid per prompt:

    step = decode step(batch) + (1 - (1 - f)^N) x [prompt marginal less experts] + f x [experts marginal]

`prompt_sync=True` (TensorRT-LLM's `attention_dp_config: enable_balance`, which holds prompts until
every rank has one) runs them in the same steps: N = 1 above. Independence is an assumption between
two bounds: fully lined-up ranks (the sync formula) and fully staggered ones (min(1, N x f) of the
steps), docs/costmodel.md compares the three on the published points. With chunked prefill every rank
carries a chunk every step, so the ranks stay balanced and none of this applies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from costmodels.errors import InputError
from costmodels.model_shape import ModelShape
from costmodels.serving import DecodeDeployment, Estimate, PrefillDeployment, estimate_decode, estimate_prefill
from costmodels.topology import Topology


@dataclass(frozen=True)
class AggregatedDeployment:
    """A colocated instance serving both phases: `decode` is its decode side (mode colocated);
    `input_len`, `output_len` and `prefix_hit` fix the chunk of prompt tokens mixed into each step."""

    decode: DecodeDeployment
    input_len: int = 4096
    output_len: int = 1024
    prefix_hit: float = 0.0
    chunked: bool = True  # False: each prompt runs whole in one step (no chunked prefill)
    max_num_tokens: int = 0  # per-die token budget of one step (engine setting); 0 = unbounded
    prompt_sync: bool = False  # unchunked: attention-DP ranks run their prompts in the same steps

    # The fields the planner reads off any deployment (instance size, microbatches, head-TP, batch).
    @property
    def devices(self) -> int:
        return self.decode.devices

    @property
    def microbatches(self) -> int:
        return self.decode.microbatches

    @property
    def attn_tp(self) -> int:
        return self.decode.attn_tp

    @property
    def batch_per_device(self) -> float:
        return self.decode.batch_per_device

    @property
    def tokens_per_step(self) -> float:
        """Output tokens per sequence per step (1 + MTP acceptance)."""
        return 1.0 + self.decode.mtp_accept

    @property
    def chunk_tokens_per_device(self) -> float:
        """Prompt tokens per device per step that admit requests as fast as decode finishes them."""
        return self.decode.batch_per_device * self.tokens_per_step * self.input_len / self.output_len

    def prompts_per_step(self, dies: int) -> float:
        """Unchunked: whole prompts per die in a step that carries prompts (the token budget's room)."""
        tokens = self.input_len * (1.0 - self.prefix_hit)
        if self.max_num_tokens <= 0 or tokens <= 0:
            return 1.0
        room = self.max_num_tokens - self.decode.batch_per_device / dies * self.tokens_per_step
        return float(max(1, int(room // tokens)))

    def with_balance(self, imbalance: float, redundant: int) -> AggregatedDeployment:
        """The same deployment re-scored at the balancer's expert imbalance and exact slot layout."""
        return replace(self, decode=replace(self.decode, imbalance=imbalance, redundant_experts=redundant))


def _prefill(dep: AggregatedDeployment, tokens_per_device: float) -> PrefillDeployment:
    d = dep.decode
    return PrefillDeployment(devices=d.devices, ep=d.ep, quant=d.quant, kv_dtype=d.kv_dtype,
                             microbatches=d.microbatches, imbalance=d.imbalance, attn_tp=d.attn_tp,
                             redundant_experts=d.redundant_experts, tokens_per_device=int(math.ceil(tokens_per_device)),
                             prompt_len=dep.input_len, prefix_hit=dep.prefix_hit)


def chunk_stages(shape: ModelShape, topo: Topology, dep: AggregatedDeployment,
                 tokens_per_device: float) -> dict[str, float]:
    """What a chunk of `tokens_per_device` prompt tokens adds to a mixed step, per stage (ms): a prefill
    batch of the chunk plus the decode batch's tokens, less one of the decode tokens alone. The decode
    tokens already pay the step's fixed costs (weight reads of the experts they touch, collective
    latency floors), so those are not counted twice; the experts only the chunk touches are."""
    floor_tokens = max(float(topo.dies_per_device), dep.decode.batch_per_device * dep.tokens_per_step)
    full = estimate_prefill(shape, topo, _prefill(dep, floor_tokens + tokens_per_device))
    floor = estimate_prefill(shape, topo, _prefill(dep, floor_tokens))
    # kv_transfer is the prefill instance's hand-off to decode: no part of a mixed step
    return {k: v - floor.breakdown.get(k, 0.0) for k, v in full.breakdown.items() if k != "kv_transfer"}


def chunk_ms(shape: ModelShape, topo: Topology, dep: AggregatedDeployment, tokens_per_device: float) -> float:
    """What a chunk of `tokens_per_device` prompt tokens adds to a mixed step (ms): chunk_stages summed.
    `podplan simulate` costs every chunk it runs with this."""
    return max(0.0, sum(chunk_stages(shape, topo, dep, tokens_per_device).values()))


def attention_dp_ranks(topo: Topology, dep: AggregatedDeployment) -> int:
    """Attention-DP ranks of the instance: each admits and runs its own prompts."""
    return max(1, dep.devices * topo.dies_per_device // max(1, dep.attn_tp))


def prompt_step_cost(stages: dict[str, float], f: float, ranks: int) -> tuple[float, float]:
    """Unchunked: mean time whole prompts add to a step (ms), and the share of steps that wait for one.

    stages: chunk_stages of one prompt step with every rank carrying its prompts; f: the share of a
    rank's steps that carry prompts; ranks: attention-DP ranks admitting prompts independently (1 when
    they are lined up). The routed experts' part scales with the prompts in the step; the rest is the
    prompt rank's own critical path, paid once in any step some rank carries a prompt (module docstring)."""
    waiting = 1.0 - (1.0 - f) ** ranks
    experts = max(0.0, stages.get("experts", 0.0))
    own = max(0.0, sum(stages.values()) - experts)
    return waiting * own + f * experts, waiting


def estimate_aggregated(shape: ModelShape, topo: Topology, dep: AggregatedDeployment) -> Estimate:
    """Mixed-step time, TPOT, TTFT and output tokens/s per device of an aggregated instance."""
    if dep.decode.mode != "colocated":
        raise InputError(f"aggregated serving runs colocated instances, not {dep.decode.mode} ones; "
                         "use --mode disagg for disaggregated MoE-attention decode")
    if dep.input_len <= 0 or dep.output_len <= 0:
        raise InputError(f"--input-len/--output-len must be > 0 (got {dep.input_len}, {dep.output_len})")
    dec = estimate_decode(shape, topo, dep.decode)
    dies = topo.dies_per_device
    chunk = dep.chunk_tokens_per_device
    computed_prompt = dep.input_len * (1.0 - dep.prefix_hit)
    whole = dep.prompts_per_step(dies) * dep.input_len * dies  # prompt tokens per device in a prompt step
    if not dep.chunked and chunk < whole:
        # whole prompts in a fraction of the steps (module docstring)
        prompt_steps = chunk / whole
        full = estimate_prefill(shape, topo, _prefill(dep, whole))
        stages = chunk_stages(shape, topo, dep, whole)
        ranks = 1 if dep.prompt_sync else attention_dp_ranks(topo, dep)
        chunk_cost, waiting = prompt_step_cost(stages, prompt_steps, ranks)
        step_ms = dec.step_ms + chunk_cost
        ttft_ms = dec.step_ms + max(0.0, sum(stages.values()))
    else:
        prompt_steps = waiting = 1.0
        ranks = 1
        full = estimate_prefill(shape, topo, _prefill(dep, chunk))
        chunk_cost = chunk_ms(shape, topo, dep, chunk)
        step_ms = dec.step_ms + chunk_cost
        chunk_per_die = chunk * (1.0 - dep.prefix_hit) / dies
        ttft_ms = math.ceil(computed_prompt / max(chunk_per_die, 1e-9) - 1e-9) * step_ms
    tpot_ms = step_ms / dep.tokens_per_step
    breakdown = dict(dec.breakdown)
    breakdown["prefill_chunk"] = chunk_cost
    feasible = dec.feasible and full.feasible
    reason = dec.infeasible_reason or full.infeasible_reason
    memory = dict(dec.memory)
    for role, use in full.memory.items():  # the chunk's working set beside the decode batch's
        memory[role.replace("prefill die", "aggregated die (prefill chunk)")] = use
    return Estimate(
        phase="decode", mode="aggregated", step_ms=step_ms, tpot_ms=tpot_ms, ttft_ms=ttft_ms,
        throughput_per_device=dep.batch_per_device * dep.tokens_per_step / step_ms * 1e3,
        breakdown=breakdown,
        memory_per_device_gb=max(dec.memory_per_device_gb, full.memory_per_device_gb),
        memory=memory, feasible=feasible, infeasible_reason=reason if not feasible else "",
        details={"decode": dec.details, "chunk_tokens_per_device": chunk, "chunk_ms": chunk_cost,
                 "decode_step_ms": dec.step_ms, "prefill_steps_per_prompt": ttft_ms / step_ms if step_ms else 0.0,
                 "chunked": dep.chunked, "prompt_step_fraction": prompt_steps,
                 "prompt_ranks": ranks, "steps_waiting_for_prompt": waiting},
    )
