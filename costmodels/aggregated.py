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

with the attention-DP ranks taking their prompts in the same steps (trtllm-bench starts every request
of a run together, and the MoE layers synchronise the ranks every step); TTFT is one such step.
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


def chunk_ms(shape: ModelShape, topo: Topology, dep: AggregatedDeployment, tokens_per_device: float) -> float:
    """What a chunk of `tokens_per_device` prompt tokens adds to a mixed step (ms): a prefill batch of the
    chunk plus the decode batch's tokens, less one of the decode tokens alone. The decode tokens already
    pay the step's fixed costs (weight reads of the experts they touch, collective latency floors), so
    those are not counted twice; the experts only the chunk touches are. `podplan simulate` costs
    every chunk it runs with this."""
    floor_tokens = max(float(topo.dies_per_device), dep.decode.batch_per_device * dep.tokens_per_step)
    full = estimate_prefill(shape, topo, _prefill(dep, floor_tokens + tokens_per_device))
    floor = estimate_prefill(shape, topo, _prefill(dep, floor_tokens))
    return max(0.0, full.step_ms - floor.step_ms)


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
        prompt_step_ms = chunk_ms(shape, topo, dep, whole)
        chunk_cost = prompt_steps * prompt_step_ms
        step_ms = dec.step_ms + chunk_cost
        ttft_ms = dec.step_ms + prompt_step_ms
    else:
        prompt_steps = 1.0
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
                 "chunked": dep.chunked, "prompt_step_fraction": prompt_steps},
    )
