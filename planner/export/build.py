"""`export_plan`: every file of one format for every group of a plan, plus manifest.json, in memory.

Layer indexing differs per engine (each Exporter's `layer_ids`, recorded in the manifest and checked
by tests/planner/test_export.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.export.context import disaggregated_pd, engine_platform, launch_context, serve_context
from planner.export.exporter import Exporter
from planner.export.folder import MANIFEST, SCHEMA
from planner.export.groups import groups_of
from planner.export.platform import platform_of
from planner.export.registry import exporter_for
from planner.export.render import json_bytes
from planner.ir import plan as ir


@dataclass(frozen=True)
class Export:
    """Everything an export writes (relative path -> bytes) and one-line notes for stderr."""

    format: str
    files: dict[str, bytes]
    notes: tuple[str, ...]


def _runs_an_engine(exporter: Exporter) -> bool:
    """Whether a format writes launch scripts (an engine runs it), not only tables."""
    return "launch.sh" in exporter.templates


def export_plan(plan: ir.Plan, fmt: str, *, plan_file: str = "PLAN.json") -> Export:
    """All files of `fmt` for every phase shape of `plan`, plus a manifest."""
    exporter = exporter_for(fmt)
    platform = platform_of(plan.topology)
    notes: list[str] = []
    files: dict[str, bytes] = {}
    manifest_groups = []
    groups = groups_of(plan, notes)
    for group in groups:
        ctx = launch_context(plan, group, fmt, plan_file)
        written = exporter.write_group(plan, group, ctx)
        if "launch.sh" in written and ctx["uneven_nodes"]:
            notes.append(f"{group.name}: servers hold different numbers of the group's devices; engines expect the "
                         "same count per node, launch.sh lists each node's devices as planned")
        for rel, data in sorted(written.items()):
            files[f"{group.name}/{rel}"] = data
        manifest_groups.append({
            "name": group.name, "phase": group.phase,
            "serves": ["prefill", "decode"] if plan.aggregated else [group.phase],  # aggregated: both phases
            "instances": [i.id for i in group.instances],
            "devices": [ir.device_ranges(i.devices) for i in group.instances], "ep_ranks": group.ranks,
            "slots_per_rank": group.slots_per_rank, "num_physical_experts": group.num_physical,
            "redundant_experts": group.num_physical - plan.model.num_routed_experts,
            "files": sorted(f"{group.name}/{rel}" for rel in written),
        })
    serve: dict[str, bytes] = {}
    if disaggregated_pd(plan):
        serve = exporter.write_serve(serve_context(plan, fmt, plan_file, groups))
        files.update(serve)
    if engine_platform(plan, fmt) != platform and _runs_an_engine(exporter):
        notes.append(f"{fmt} runs on {engine_platform(plan, fmt).label}, not {plan.topology.hardware}: the scripts "
                     "are for a cluster of the same shape on that platform, where the plan's predictions do not hold")
    notes += exporter.notes(plan, platform)
    notes = list(dict.fromkeys(notes))  # one line per distinct limitation
    manifest = {
        "schema": SCHEMA, "format": fmt, "layer_ids": exporter.layer_ids,
        "plan": {"file": plan_file, "model": plan.model.name, "topology": plan.topology.name,
                 "sha256": plan.digest()},
        "groups": manifest_groups, "serve": sorted(serve), "notes": notes,
    }
    files[MANIFEST] = json_bytes(manifest, indent=True)
    return Export(format=fmt, files=files, notes=tuple(notes))
