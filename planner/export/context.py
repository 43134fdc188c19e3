"""What the templates see for one group: sizes, nodes, flags, and the plan's names (quoted by the templates).

Engine facts behind the values (read in the engines' sources; docs/export.md names the versions):
- SGLang divides `--chunked-prefill-size` and `--max-running-requests` by the attention-DP size when DP
  attention is on, so both are written instance-wide; vLLM and TensorRT-LLM run one scheduler per DP
  rank, so their batch limits are written per DP rank.
- The engine's platform, not the plan's, names the visible-devices variable: TensorRT-LLM is a CUDA
  engine and vllm-ascend an Ascend one whatever hardware the plan was compiled for.
- An aggregated plan's instances run both phases: each step carries the decode batch and a chunk of
  prompt tokens. vLLM's --max-num-batched-tokens and TensorRT-LLM's --max_num_tokens bound all tokens
  of a step (a decode sequence schedules 1 + draft tokens); SGLang's --chunked-prefill-size under
  --enable-mixed-chunk is spent on the running sequences first (one token each), the rest on prompts.
"""

from __future__ import annotations

from costmodels.aggregated import AggregatedDeployment
from costmodels.serving import DecodeDeployment
from planner.export.checkpoint import (
    SGLANG_A2A_ARCHITECTURES,
    SGLANG_EXPERT_LOCATION_ARCHITECTURES,
    architecture,
    checkpoint_quant,
)
from planner.export.groups import Group
from planner.export.platform import CUDA, NPU, Platform, platform_of
from planner.frontend.zoo import BUNDLED
from planner.ir import plan as ir

# Bundled models whose checkpoint needs code from its own repository even where the engine has the
# architecture: Kimi K2's tokenizer (tiktoken-based) ships as repository code. Every other bundled
# model (DeepSeek-V3, Qwen3-MoE, Mixtral, OLMoE, gpt-oss) is in SGLang and vLLM natively, and
# running a checkpoint's code is a choice the user makes (extra flags pass through launch.sh).
REMOTE_CODE_MODELS = frozenset({"kimi-k2"})

# The platform each engine runs on when it is fixed by the engine itself (None: the plan's platform).
ENGINE_PLATFORM: dict[str, Platform | None] = {"sglang": None, "vllm": None, "vllm-ascend": NPU, "trtllm": CUDA,
                                               "eplb": None}

# The engines' own default HTTP ports (SGLang 30000, vLLM and trtllm-serve 8000).
DEFAULT_PORT = {"sglang": 30000, "vllm": 8000, "vllm-ascend": 8000, "trtllm": 8000}


def engine_platform(plan: ir.Plan, fmt: str) -> Platform:
    """Where the engine's processes run: its own platform, or the plan's for engines that run on several."""
    return ENGINE_PLATFORM.get(fmt) or platform_of(plan.topology)


def hf_repo(plan: ir.Plan) -> str:
    """The checkpoint a launch script loads by default: the bundled model's repository, else the model name."""
    repo = BUNDLED.get(plan.model.name, ("",))[0]
    return repo if repo and not repo.startswith("(") else plan.model.name


def quantization(plan: ir.Plan, fmt: str) -> tuple[str | None, str]:
    """(`--quantization` value or None, why) for the engine of `fmt`.

    A checkpoint that ships quantised weights carries its method in config.json and the engines refuse
    a different `--quantization`, so none is written; on Ascend, int8 means an msModelSlim W8A8
    checkpoint (SGLang: modelslim, vLLM-Ascend: ascend)."""
    quant, shipped = plan.workload.quant, checkpoint_quant(hf_repo(plan))
    npu = engine_platform(plan, fmt) == NPU
    if npu and quant == "int8":
        value = "modelslim" if fmt == "sglang" else "ascend"
        return value, "W8A8 weights quantised with msModelSlim (assumption: MODEL_PATH is such a checkpoint)"
    if shipped is not None:
        if shipped == quant:
            return None, f"the checkpoint ships {shipped} weights; the engine reads the method from its config.json"
        return None, (f"the checkpoint ships {shipped} weights (the engine reads the method from its config.json); "
                      f"the plan sized the weights at {quant}")
    if quant == "fp8" and not npu:
        return "fp8", "FP8 weights quantised at load time from the bf16 checkpoint"
    if quant == "int8" and fmt == "sglang" and not npu:
        return "w8a8_int8", "W8A8 int8 weights (assumption: MODEL_PATH is such a checkpoint)"
    if quant == "bf16":
        return None, "bf16 weights as the checkpoint ships them"
    return None, f"{quant} weights: the engine reads the method from the checkpoint (assumption: a {quant} one)"


def _attention_split(inst: ir.Instance, ranks: int) -> tuple[int, int]:
    """(attention TP, attention DP) over the EP ranks: the plan's attention TP stays, DP fills the rest."""
    attn_tp = inst.attention_tp if ranks % inst.attention_tp == 0 else 1
    return attn_tp, ranks // attn_tp


def _phase_split(plan: ir.Plan, phase: str) -> dict:
    """The first instance of a phase as its peer engines see it (the KV connector's dp/tp sizes)."""
    p = plan.phases[phase]
    inst = p.instances[0]
    ranks = len(inst.expert_devices) * plan.topology.dies_per_device
    tp, dp = _attention_split(inst, ranks)
    return {"tp": tp, "dp": dp, "instances": len(p.instances)}


def launch_context(plan: ir.Plan, group: Group, fmt: str, plan_file: str) -> dict:
    m, t, wl = plan.model, plan.topology, plan.workload
    first = group.instances[0]
    dies = group.ranks // len(group.devices)
    nodes = [_nodes(plan, tuple(inst.expert_devices), dies) for inst in group.instances]
    instances = [{"id": inst.id, "nodes": servers} for inst, servers in zip(group.instances, nodes)]
    per_node = sorted({server["ranks"] for servers in nodes for server in servers})
    # attention DP over the EP ranks (colocated: the same devices; disaggregated: the expert devices
    # host the exported group)
    attn_tp, attn_dp = _attention_split(first, group.ranks)
    attention_devices = len(first.attention_devices) if first.mode == "colocated" else len(first.expert_devices)
    # the instance's whole batch: sequences in flight (decode) or prompt tokens per step (prefill)
    total = int(round(first.batch_per_device * attention_devices))
    seqs = total if group.phase == "decode" else 0
    prefill_tokens = total if group.phase == "prefill" else 0
    mtp = wl.mtp_accept > 0 and group.phase == "decode"
    # aggregated: the prompt tokens each step of the instance computes beside its decode batch
    chunk = int(round(chunk_tokens_per_device(plan, first) * attention_devices)) if plan.aggregated else 0
    draft = 1 if mtp else 0  # the scripts run one MTP draft token
    quant_flag, quant_why = quantization(plan, fmt)
    arch = architecture(m)
    pd = disaggregated_pd(plan)
    return {
        "engine": fmt, "plan_file": plan_file, "model": m.name, "hf_repo": hf_repo(plan),
        "trust_remote_code": m.name in REMOTE_CODE_MODELS,
        "topology": t.name, "hardware": t.hardware, "plan_platform": platform_of(t),
        "platform": engine_platform(plan, fmt),
        "group": group.name, "phase": group.phase,
        "phase_label": "prefill+decode (aggregated)" if plan.aggregated else group.phase,
        "instances": instances, "nnodes": len(nodes[0]),
        "ranks": group.ranks, "rank_unit": "die" if dies > 1 else "device", "uneven_nodes": len(per_node) > 1,
        "slots_per_rank": group.slots_per_rank, "num_physical": group.num_physical,
        "experts": m.num_routed_experts, "redundant": group.num_physical - m.num_routed_experts,
        "attn_tp": attn_tp, "attn_dp": attn_dp, "max_seqs": seqs, "max_seqs_per_dp": max(1, seqs // attn_dp),
        "prefill_tokens": prefill_tokens, "prefill_tokens_per_dp": max(1, prefill_tokens // attn_dp),
        "aggregated": plan.aggregated, "chunk_tokens": chunk, "chunk_tokens_per_dp": max(1, chunk // attn_dp),
        # a step's whole token budget per DP rank (vLLM, TensorRT-LLM): decode tokens, then the prompt chunk
        "tokens_per_seq": 1 + draft,
        "step_tokens_per_dp": max(1, seqs // attn_dp) * (1 + draft) + max(1, chunk // attn_dp),
        "context_len": wl.input_len + wl.output_len,
        "mtp": mtp, "quant": wl.quant,
        "quant_flag": quant_flag or "", "quant_why": quant_why,
        "architecture": arch or "", "a2a": arch in SGLANG_A2A_ARCHITECTURES,
        "expert_location": arch in SGLANG_EXPERT_LOCATION_ARCHITECTURES,
        "afd": first.mode == "disaggregated",
        "pd": pd, "peers": {p: _phase_split(plan, p) for p in ("prefill", "decode")} if pd else {},
        "moe_layers": list(m.moe_layers), "default_port": DEFAULT_PORT.get(fmt, 8000),
    }


def chunk_tokens_per_device(plan: ir.Plan, inst: ir.Instance) -> float:
    """Prompt tokens an aggregated instance computes per attention device and step: the chunk that admits
    requests as fast as its decode batch finishes them (costmodels.aggregated), less the cached prefix."""
    wl = plan.workload
    dep = AggregatedDeployment(DecodeDeployment(batch_per_device=inst.batch_per_device, mtp_accept=wl.mtp_accept),
                               input_len=wl.input_len, output_len=wl.output_len, prefix_hit=wl.prefix_hit)
    return dep.chunk_tokens_per_device * (1.0 - wl.prefix_hit)


def _nodes(plan: ir.Plan, devices: tuple[int, ...], dies: int) -> list[dict]:
    """The servers an instance's EP devices sit on, each with the local ids its engine process sees."""
    t = plan.topology
    by_server: dict[int, list[int]] = {}
    for d in sorted(devices):
        by_server.setdefault(t.server_of(d), []).append(d)
    out = []
    for rank, (server, ds) in enumerate(sorted(by_server.items())):
        local = [(d % t.devices_per_server) * dies + k for d in ds for k in range(dies)]
        out.append({"rank": rank, "server": server, "devices": ir.device_ranges(ds),
                    "visible": ",".join(map(str, local)), "ranks": len(local)})
    return out


def disaggregated_pd(plan: ir.Plan) -> bool:
    """Prefill and decode on separate devices: the engines' P/D disaggregation (KV moves between them)."""
    if plan.prefill is None or plan.decode is None:
        return False
    return not set(plan.prefill.devices) & set(plan.decode.devices)


def serve_context(plan: ir.Plan, fmt: str, plan_file: str, groups: list[Group]) -> dict:
    """What the plan-level serving files (router, proxy, disaggregated-server config) see."""
    return {
        "engine": fmt, "plan_file": plan_file, "model": plan.model.name, "hf_repo": hf_repo(plan),
        "topology": plan.topology.name, "hardware": plan.topology.hardware, "platform": engine_platform(plan, fmt),
        "prefill_instances": len(plan.prefill.instances) if plan.prefill else 0,
        "decode_instances": len(plan.decode.instances) if plan.decode else 0,
        "prefill_groups": [g.name for g in groups if g.phase == "prefill"],
        "decode_groups": [g.name for g in groups if g.phase == "decode"],
        "context_len": plan.workload.input_len + plan.workload.output_len,
        "default_port": DEFAULT_PORT.get(fmt, 8000),
    }
