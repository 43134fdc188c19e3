"""Export a plan to serving engines: expert-placement files and launch scripts, one folder per phase shape.

`export_plan(plan, fmt)` builds every file in memory (validated); `write_export` writes them into a
temp folder and renames it into place, so an error never leaves a half-written export.
Layer indexing per engine (checked by tests/planner/test_export.py):
  sglang        all decoder layers, rows of dense layers unused (SGLang sizes the map by
                config.num_hidden_layers; they hold its trivial layout, physical p -> p % E)
  vllm, vllm-ascend, eplb   MoE layers only, 0..L-1 in model order (vLLM's num_moe_layers;
                vllm-ascend's layer_list, which it offsets by the dense layers itself)
  trtllm        decoder layer ids of the MoE layers (initial_global_assignments keys)
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import jinja2
import numpy as np

from costmodels.errors import InputError
from planner.ir import plan as ir

FORMATS = ("sglang", "vllm", "vllm-ascend", "trtllm", "eplb")
MANIFEST = "manifest.json"
SCHEMA = "podplan.export/1"


@dataclass(frozen=True)
class Group:
    """Instances of one phase sharing a placement and a shape: one folder of engine files.

    The engine's EP ranks are the dies of the expert devices in ascending device order (how the
    launch scripts enumerate nodes and visible devices); `phy2log` [L, R] is the placement in that
    rank order, R = ranks x slots_per_rank physical experts.
    """

    name: str
    phase: str
    instances: tuple[ir.Instance, ...]
    placement: ir.ExpertPlacement
    devices: tuple[int, ...]  # the EP devices in engine rank order
    ranks: int
    slots_per_rank: int
    phy2log: np.ndarray

    @property
    def num_physical(self) -> int:
        return self.ranks * self.slots_per_rank


@dataclass(frozen=True)
class Export:
    """Everything an export writes (relative path -> bytes) and one-line notes for stderr."""

    format: str
    files: dict[str, bytes]
    notes: tuple[str, ...]


def export_plan(plan: ir.Plan, fmt: str, *, plan_file: str = "PLAN.json") -> Export:
    """All files of `fmt` for every phase shape of `plan`, plus a manifest."""
    if fmt not in FORMATS:
        raise InputError(f"export: unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    notes: list[str] = []
    files: dict[str, bytes] = {}
    manifest_groups = []
    for group in groups_of(plan, notes):
        ctx = _context(plan, group, fmt, plan_file)
        written = _FORMATTERS[fmt](plan, group, ctx)
        if fmt != "eplb":
            written["launch.sh"] = _launch(group, fmt, ctx, notes)
        for rel, data in sorted(written.items()):
            files[f"{group.name}/{rel}"] = data
        manifest_groups.append({
            "name": group.name, "phase": group.phase, "instances": [i.id for i in group.instances],
            "devices": [ir.device_ranges(i.devices) for i in group.instances], "ep_ranks": group.ranks,
            "slots_per_rank": group.slots_per_rank, "num_physical_experts": group.num_physical,
            "redundant_experts": group.num_physical - plan.model.num_routed_experts,
            "files": sorted(f"{group.name}/{rel}" for rel in written),
        })
    notes += _engine_notes(plan, fmt)
    notes = list(dict.fromkeys(notes))  # one line per distinct limitation
    manifest = {
        "schema": SCHEMA, "format": fmt, "layer_ids": _LAYER_IDS[fmt],
        "plan": {"file": plan_file, "model": plan.model.name, "topology": plan.topology.name,
                 "sha256": plan.digest()},
        "groups": manifest_groups, "notes": notes,
    }
    files[MANIFEST] = _json(manifest, indent=True)
    return Export(format=fmt, files=files, notes=tuple(notes))


_LAYER_IDS = {
    "sglang": "decoder layers 0..num_layers-1 (dense rows unused)",
    "vllm": "MoE layers 0..L-1 in model order",
    "vllm-ascend": "MoE layers 0..L-1 in model order",
    "eplb": "MoE layers 0..L-1 in model order",
    "trtllm": "decoder layer ids of the MoE layers",
}


def groups_of(plan: ir.Plan, notes: list[str]) -> list[Group]:
    """Phase shapes: instances of a phase with the same placement and device counts, in plan order."""
    out = []
    for phase_name, phase in plan.phases.items():
        keyed: dict[tuple, list[ir.Instance]] = {}
        for inst in phase.instances:
            key = (inst.experts, inst.mode, len(inst.devices), len(inst.attention_devices), len(inst.expert_devices))
            keyed.setdefault(key, []).append(inst)
        for k, (key, members) in enumerate(keyed.items()):
            name = phase_name if len(keyed) == 1 else f"{phase_name}-{k}"
            out.append(_group(plan, name, phase_name, tuple(members), phase.experts[key[0]], notes))
    return out


def _group(plan: ir.Plan, name: str, phase: str, members: tuple[ir.Instance, ...], placement: ir.ExpertPlacement,
           notes: list[str]) -> Group:
    dies = plan.topology.dies_per_device
    S = placement.slots_per_device
    first = members[0]
    if placement.weighted:
        notes.append(f"{name}: engines split an expert's tokens evenly over its replicas, not by the plan's "
                     "weighted shares; exported the same slots with an equal split")
    if first.mode == "disaggregated":
        notes.append(f"{name}: engines cannot express disaggregated MoE-attention ({len(first.attention_devices)} "
                     f"attention + {len(first.expert_devices)} expert devices); exported the expert devices' "
                     "placement as one colocated EP group on those devices")
    if set(first.shared_expert_devices) - set(first.expert_devices):
        notes.append(f"{name}: engines replicate the shared experts on every EP rank, not on dedicated devices; "
                     "the dedicated shared-expert devices are left out of the EP group")
    if S % dies:
        notes.append(f"{name}: {S} slots per device do not split over its {dies} dies; exported one EP rank "
                     "per device")
        dies = 1
    # Engine rank order: ascending device id (node by node, then local index); the plan orders
    # slots by expert_devices, so permute the slot blocks of each device.
    order = sorted(range(len(first.expert_devices)), key=lambda k: first.expert_devices[k])
    table = np.array([lp.phy2log for lp in placement.layers], dtype=np.int64).reshape(len(placement.layers), -1, S)
    phy2log = table[:, order, :].reshape(len(placement.layers), -1)
    devices = tuple(first.expert_devices[k] for k in order)
    return Group(name=name, phase=phase, instances=members, placement=placement, devices=devices,
                 ranks=len(devices) * dies, slots_per_rank=S // dies, phy2log=phy2log)


# --- placement files, one builder per engine --------------------------------------------------------


def eplb_tensors(plan: ir.Plan, group: Group) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """phy2log [L, R], log2phy [L, E, X] (-1 padded, X = most replicas of any expert), logcnt [L, E]."""
    E = plan.model.num_routed_experts
    phy2log = group.phy2log
    logcnt = np.stack([np.bincount(row, minlength=E) for row in phy2log]).astype(np.int64)
    log2phy = _log2phy(phy2log, E, int(logcnt.max()))
    return phy2log, log2phy, logcnt


def _log2phy(phy2log: np.ndarray, experts: int, width: int) -> np.ndarray:
    out = np.full((phy2log.shape[0], experts, width), -1, dtype=np.int64)
    for layer, row in enumerate(phy2log):
        filled = np.zeros(experts, dtype=np.int64)
        for slot, e in enumerate(row):
            out[layer, e, filled[e]] = slot
            filled[e] += 1
    return out


def _sglang(plan: ir.Plan, group: Group, ctx: dict) -> dict[str, bytes]:
    m = plan.model
    rows = np.tile(np.arange(group.num_physical) % m.num_routed_experts, (m.num_layers, 1))
    for i, layer in enumerate(m.moe_layers):
        rows[layer] = group.phy2log[i]
    return {"expert_location.json": _json({"physical_to_logical_map": rows.tolist()})}


def _vllm(plan: ir.Plan, group: Group, ctx: dict) -> dict[str, bytes]:
    import torch  # lazy: only this format writes a .pt

    E = plan.model.num_routed_experts
    redundant = group.num_physical - E
    phy2log, _, logcnt = eplb_tensors(plan, group)
    # vLLM pads logical_to_physical_map to num_redundant_experts + 1 replicas per expert.
    l2p = _log2phy(phy2log, E, redundant + 1)
    state = {"physical_to_logical_map": phy2log, "logical_to_physical_map": l2p, "logical_replica_count": logcnt}
    buf = io.BytesIO()
    torch.save({k: torch.from_numpy(v.copy()) for k, v in state.items()}, buf)
    doc = {k: v.tolist() for k, v in state.items()}
    doc.update(num_redundant_experts=redundant, moe_layers=list(plan.model.moe_layers))
    return {"eplb_state.json": _json(doc), "eplb_state.pt": buf.getvalue()}


def _vllm_ascend(plan: ir.Plan, group: Group, ctx: dict) -> dict[str, bytes]:
    spr = group.slots_per_rank
    layers = [
        {"layer_id": i, "device_count": group.ranks,
         "device_list": [{"device_id": r, "device_expert": [int(e) for e in row[r * spr:(r + 1) * spr]]}
                         for r in range(group.ranks)]}
        for i, row in enumerate(group.phy2log)
    ]
    return {"expert_map.json": _json({"moe_layer_count": len(layers), "layer_list": layers})}


def _trtllm(plan: ir.Plan, group: Group, ctx: dict) -> dict[str, bytes]:
    assignments = {str(layer): [int(e) for e in group.phy2log[i]] for i, layer in enumerate(plan.model.moe_layers)}
    config = {"num_slots": group.num_physical, "initial_global_assignments": assignments, "layer_updates_per_iter": 0}
    return {
        "moe_load_balancer.json": _json(config),
        "moe_load_balancer.py": _render("moe_load_balancer.py.j2", ctx).encode(),
        "extra_llm_api_options.yaml": _render("trtllm_extra_options.yaml.j2", dict(ctx, assignments=[
            (layer, group.phy2log[i].tolist()) for i, layer in enumerate(plan.model.moe_layers)])).encode(),
    }


def _eplb(plan: ir.Plan, group: Group, ctx: dict) -> dict[str, bytes]:
    phy2log, log2phy, logcnt = eplb_tensors(plan, group)
    return {"phy2log.npy": _npy(phy2log), "log2phy.npy": _npy(log2phy), "logcnt.npy": _npy(logcnt)}


_FORMATTERS = {"sglang": _sglang, "vllm": _vllm, "vllm-ascend": _vllm_ascend, "trtllm": _trtllm, "eplb": _eplb}


def _engine_notes(plan: ir.Plan, fmt: str) -> list[str]:
    hw = plan.topology.hardware
    ascend = "ascend" in hw.lower()
    out = []
    if fmt == "vllm":
        out.append("upstream vLLM has no flag to load an initial expert map; eplb_state.{json,pt} hold "
                   "its EplbState tensors for a loader hook, and --enable-eplb rebalances from measured loads")
    if fmt == "trtllm" and ascend:
        out.append(f"TensorRT-LLM runs on NVIDIA GPUs, not {hw}; the files keep the plan's layout for "
                   "a GPU cluster of the same shape")
    if fmt == "vllm-ascend" and not ascend:
        out.append(f"vllm-ascend runs on Ascend NPUs, not {hw}; the expert map is valid for an NPU cluster of "
                   "the same shape")
    return out


# --- launch scripts -----------------------------------------------------------------------------------


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


def _context(plan: ir.Plan, group: Group, fmt: str, plan_file: str) -> dict:
    from planner.frontend.zoo import BUNDLED

    m, t, wl = plan.model, plan.topology, plan.workload
    first = group.instances[0]
    dies = group.ranks // len(group.devices)
    nodes = [_nodes(plan, tuple(inst.expert_devices), dies) for inst in group.instances]
    instances = [{"id": inst.id, "nodes": servers} for inst, servers in zip(group.instances, nodes)]
    per_node = sorted({server["ranks"] for servers in nodes for server in servers})
    nnodes = len(nodes[0])
    # attention DP over the EP ranks: the plan's attention TP stays, DP fills the rest (colocated:
    # the same devices; disaggregated: the expert devices host the exported group)
    attn_tp = first.attention_tp if group.ranks % first.attention_tp == 0 else 1
    attn_dp = group.ranks // attn_tp
    attention_devices = len(first.attention_devices) if first.mode == "colocated" else len(first.expert_devices)
    seqs = int(round(first.batch_per_device * attention_devices)) if group.phase == "decode" else 0
    tokens_per_rank = int(round(first.batch_per_device / dies)) if group.phase == "prefill" else 0
    repo = BUNDLED.get(m.name, ("",))[0]
    return {
        "engine": fmt, "plan_file": plan_file, "model": m.name,
        "hf_repo": repo if repo and not repo.startswith("(") else m.name,
        "topology": t.name, "hardware": t.hardware, "npu": "ascend" in t.hardware.lower(),
        "group": group.name, "phase": group.phase, "instances": instances, "nnodes": nnodes,
        "ranks": group.ranks, "rank_unit": "die" if dies > 1 else "device", "uneven_nodes": len(per_node) > 1,
        "slots_per_rank": group.slots_per_rank, "num_physical": group.num_physical,
        "experts": m.num_routed_experts, "redundant": group.num_physical - m.num_routed_experts,
        "attn_tp": attn_tp, "attn_dp": attn_dp, "max_seqs": seqs, "max_seqs_per_dp": max(1, seqs // attn_dp),
        "tokens_per_rank": tokens_per_rank, "context_len": wl.input_len + wl.output_len,
        "mtp": wl.mtp_accept > 0 and group.phase == "decode", "quant": wl.quant,
        "pd": _disaggregated_pd(plan), "moe_layers": list(m.moe_layers),
    }


def _disaggregated_pd(plan: ir.Plan) -> bool:
    """Prefill and decode on separate devices: the engines' P/D disaggregation (KV moves between them)."""
    if plan.prefill is None or plan.decode is None:
        return False
    return not set(plan.prefill.devices) & set(plan.decode.devices)


def _launch(group: Group, fmt: str, ctx: dict, notes: list[str]) -> bytes:
    if ctx["uneven_nodes"]:
        notes.append(f"{group.name}: servers hold different numbers of the group's devices; engines expect the "
                     "same count per node, launch.sh lists each node's devices as planned")
    template = {"sglang": "launch_sglang.sh.j2", "vllm": "launch_vllm.sh.j2", "vllm-ascend": "launch_vllm.sh.j2",
                "trtllm": "launch_trtllm.sh.j2"}[fmt]
    return _render(template, ctx).encode()


_ENV: jinja2.Environment | None = None


def _render(name: str, ctx: dict) -> str:
    global _ENV
    if _ENV is None:
        _ENV = jinja2.Environment(loader=jinja2.PackageLoader("planner.export", "templates"), autoescape=False,
                                  keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True,
                                  undefined=jinja2.StrictUndefined)
    return _ENV.get_template(name).render(**ctx)


# --- bytes and the output folder -------------------------------------------------------------------


def _json(obj: object, indent: bool = False) -> bytes:
    if indent:
        return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()
    return (json.dumps(obj, separators=(",", ":"), sort_keys=True) + "\n").encode()


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr, dtype=np.int64), allow_pickle=False)
    return buf.getvalue()


def write_export(export: Export, out_dir: str | os.PathLike[str]) -> None:
    """Write into a temp folder next to `out_dir`, then rename it into place.

    An existing `out_dir` is replaced only when it is empty or an earlier podplan export."""
    target = Path(out_dir)
    if target.exists() and not target.is_dir():
        raise InputError(f"export: {target} is a file; pass a folder path for -o")
    if target.is_dir() and any(target.iterdir()) and not _is_export(target):
        raise InputError(f"export: {target} exists and is not a podplan export; pass a new folder or empty it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        for rel, data in export.files.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            if rel.endswith(".sh"):
                path.chmod(0o755)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; give the folder a plain mkdir's mode
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old.{os.getpid()}")
            target.rename(old)
        tmp.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _is_export(folder: Path) -> bool:
    try:
        return json.loads((folder / MANIFEST).read_text()).get("schema") == SCHEMA
    except (OSError, ValueError, AttributeError):
        return False
