"""What the plan's cost model predicts for the run `podplan run` is about to make.

A plan's predictions are for its design workload (e.g. 96 sequences per device, 4096-token prompts,
INT8 weights). A run on this host serves `--prompts` prompts of `--prompt-len` tokens in the model's
own dtype (bf16 seeded weights), so its measurements are compared with the same cost model applied
to the plan's deployment at the run's batch, lengths and precision: the instances, their devices,
microbatches and expert imbalance stay the plan's.
"""

from __future__ import annotations

import dataclasses
import math

from planner.ir import plan as ir
from planner.replan import estimate_instance

RUN_QUANT = "bf16"  # the runtime runs the model's own dtype: seeded bf16 weights


def run_predictions(plan: ir.Plan, *, prompts: int, prompt_len: int, new_tokens: int, model: str | None = None) -> dict:
    """Per phase: step/TPOT/TTFT, throughput and the breakdown for the run's workload (predictions_of's shape).

    model: the config path of a plan compiled from a user's config (else the plan's bundled name)."""
    from costmodels.topology import get_topology
    from planner.frontend.shape import shape_of

    shape = shape_of(model or plan.model.name)
    topo = get_topology(plan.topology.name)
    workload = dataclasses.replace(plan.workload, input_len=prompt_len, output_len=max(new_tokens, 1),
                                   quant=RUN_QUANT, prefix_hit=0.0, mtp_accept=0.0)
    run_plan = dataclasses.replace(plan, workload=workload)
    out: dict = {"model": plan.model.name, "topology": plan.topology.name, "quant": RUN_QUANT,
                 "workload": {"prompts": prompts, "prompt_len": prompt_len, "new_tokens": new_tokens},
                 "basis": "the plan's deployment at this run's batch, lengths and bf16 weights"}
    # an aggregated plan (one phase set serving both) processes the prompts on its decode instances
    serving = {"prefill": plan.prefill or plan.decode, "decode": plan.decode or plan.prefill}
    for name, phase in serving.items():
        if phase is None:
            continue
        insts = phase.instances
        attention_ranks = sum(len(i.attention_devices) for i in insts)
        per_rank = math.ceil(prompts / max(attention_ranks, 1))  # the busiest rank sets the step time
        worst = None
        for inst in insts:
            batch = per_rank * (prompt_len if name == "prefill" else 1)
            placement = phase.experts[inst.experts]
            balances = [lp.balance for lp in placement.layers if lp.balance is not None]
            imbalance = max(1.0, sum(balances) / len(balances)) if balances else 1.0
            # the runtime runs the prompts as one prefill step, then decode steps: no chunking
            est = estimate_instance(run_plan, name, dataclasses.replace(inst, batch_per_device=float(batch)), shape,
                                    topo, imbalance, chunked=False)
            latency = est.tpot_ms if name == "decode" else est.ttft_ms
            if worst is None or (latency or 0) > (worst[0] or 0):
                worst = (latency, est)
        assert worst is not None
        est = worst[1]
        out[name] = {"step_ms": est.step_ms, "tpot_ms": est.tpot_ms if name == "decode" else None,
                     "ttft_ms": est.ttft_ms if name == "prefill" else None,
                     "throughput_per_device": est.throughput_per_device, "breakdown": dict(est.breakdown),
                     "batch_per_device": per_rank if name == "decode" else per_rank * prompt_len}
    out["cut_bytes_per_token"] = sum(s.bytes_in_per_token + s.bytes_out_per_token for s in plan.stages
                                     if s.kind == "routed_experts")
    return out
