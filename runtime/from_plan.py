"""Plan IR -> RunSpec: device d of a local:N plan is rank d; instances, placements and shares carry over.

A plan with both phases runs prefill and decode on their own instances (the KV cache moves from
the prefill ranks to the decode ranks); a plan with one phase runs both phases on its instances.
"""

from __future__ import annotations

from pathlib import Path

from planner.ir.plan import Plan
from planner.frontend.zoo import BUNDLED, ModelSource, load_source
from runtime.errors import SpecError
from runtime.spec import InstanceSpec, LayerSlots, RunSpec, equal_shares


def model_source(plan: Plan, model_config: str | None = None) -> ModelSource:
    """The model a plan names: a bundled name, or the config the user passes, checked against the digest.

    A plan names a model, it does not choose files to open: `plan.model.name` is never read as a
    path (a plan from someone else could name any file), so a plan of a user's config needs
    `--model-config PATH`, the path coming from the command line.
    """
    name = plan.model.name
    if model_config is None:
        if name not in BUNDLED:
            raise SpecError(f"plan.model.name: {name[:80]!r} is not a bundled model, and podplan does not open files a "
                            "plan names; pass its config with --model-config PATH (checked against the plan's "
                            "config_sha256)")
        return _matching(load_source(name), plan, f"plan.model.config_sha256: the plan was compiled for another "
                         f"config of '{name}' than the one podplan loads now; recompile the plan")
    if model_config in BUNDLED:
        raise SpecError(f"--model-config {model_config}: give the path of a config.json or a model folder; "
                        "bundled models need no --model-config")
    return _matching(load_source(model_config), plan, f"--model-config {model_config}: its digest is not the "
                     "plan's model.config_sha256; pass the config the plan was compiled from")


def _matching(src: ModelSource, plan: Plan, mismatch: str) -> ModelSource:
    """`src` if it is the config the plan was compiled from (its digest), else SpecError(mismatch)."""
    if src.digest() != plan.model.config_sha256:
        raise SpecError(mismatch)
    return src


# topologies whose plans run on this host: CPU processes, or the GPUs of one host (costmodels.topology's
# HOST_GPU_KINDS; the runtime reads only the Plan IR, tests/test_layering.py checks the two agree)
HOST_GPU_KINDS = ("h100", "h200")
RUNNABLE_KINDS = ("local", *HOST_GPU_KINDS)


def auto_backend(kind: str, ranks: int) -> str:
    """nccl for a GPU-host plan, and for a local:N plan when this host has N CUDA GPUs; gloo otherwise."""
    if kind in HOST_GPU_KINDS:
        return "nccl"
    import torch

    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= ranks else "gloo"


def spec_from_plan(plan: Plan, *, prompts: int = 8, prompt_len: int = 16, new_tokens: int = 8, seed: int = 0,
                   weights: str | None = None, backend: str = "auto", model_config: str | None = None,
                   graphs: bool = True, capacity_factor: float | None = None) -> RunSpec:
    """The runtime's spec for `plan`; SpecError (one line) when the plan cannot run on this host.

    backend "auto": see `auto_backend`. With nccl the run uses static buffers (and CUDA graphs for
    decode) unless `graphs` is False. model_config: the config file of a plan compiled from a user's
    config (see `model_source`)."""
    topo = plan.topology
    if topo.kind not in RUNNABLE_KINDS:
        raise SpecError(f"plan.topology: '{topo.name}' cannot run on this host; podplan run executes plans compiled "
                        "for local:N (CPU processes) or h100:N / h200:N (the GPUs of this host)")
    if backend == "auto":
        backend = auto_backend(topo.kind, topo.num_devices)
    if topo.dies_per_device != 1:
        raise SpecError(f"plan.topology.dies_per_device: {topo.dies_per_device}; a local process is one die")
    src = model_source(plan, model_config)
    both = plan.prefill is not None and plan.decode is not None
    instances = []
    for phase, phase_plan in plan.phases.items():
        for i, inst in enumerate(phase_plan.instances):
            at = f"plan.{phase}.instances[{i}]"
            if inst.attention_tp != 1:
                raise SpecError(f"{at}.attention_tp: {inst.attention_tp}; the runtime runs attention data-parallel "
                                "only (TP 1): compile with attention TP 1")
            placement = plan.placement_of(phase, inst)
            layers = tuple(LayerSlots(lp.layer, lp.phy2log, lp.shares or equal_shares(lp.phy2log))
                           for lp in placement.layers)
            instances.append(InstanceSpec(
                name=inst.id, phases=(phase,) if both else ("prefill", "decode"),
                attention_ranks=inst.attention_devices, expert_ranks=inst.expert_devices,
                slots_per_rank=placement.slots_per_device, layers=layers, microbatches=inst.microbatches,
                shared_ranks=inst.shared_expert_devices,
            ))
    # what the workers load: the bundled name, or the user's file by absolute path (ranks may start elsewhere)
    model = plan.model.name if model_config is None else str(Path(src.origin).resolve())
    return RunSpec(model=model, world_size=topo.num_devices, instances=tuple(instances), prompts=prompts,
                   prompt_len=prompt_len, new_tokens=new_tokens, seed=seed, weights=weights, backend=backend,
                   predictions=predictions_of(plan), static=graphs and backend == "nccl",
                   capacity_factor=capacity_factor)


def predictions_of(plan: Plan) -> dict:
    """The plan's numbers the runtime can put beside its measurements."""
    out: dict = {"model": plan.model.name, "topology": plan.topology.name, "quant": plan.workload.quant}
    for phase, p in plan.phases.items():
        pred = p.predictions
        out[phase] = {"step_ms": pred.step_ms, "tpot_ms": pred.tpot_ms, "ttft_ms": pred.ttft_ms,
                      "throughput_per_device": pred.throughput_per_device, "breakdown": dict(pred.breakdown)}
    # the all-to-all: what the routed-experts stages take in (dispatch) and send back (combine)
    out["cut_bytes_per_token"] = sum(s.bytes_in_per_token + s.bytes_out_per_token for s in plan.stages
                                     if s.kind == "routed_experts")
    return out
