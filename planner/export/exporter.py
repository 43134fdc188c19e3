"""The exporter record: what one engine format writes for a group, and how.

Each engine module (sglang, vllm, vllm_ascend, trtllm, eplb) defines one `Exporter`; the registry
lists them and `export_plan` runs the chosen one over every group of a plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from planner.export.groups import Group
from planner.export.platform import Platform
from planner.export.render import render
from planner.ir import plan as ir

Files = dict[str, bytes]
# layer_ids of the formats indexed like vLLM's num_moe_layers
MOE_LAYERS = "MoE layers 0..L-1 in model order"


def _no_files(plan: ir.Plan, group: Group) -> Files:
    return {}


def _no_context(plan: ir.Plan, group: Group) -> dict:
    return {}


def _no_notes(plan: ir.Plan, platform: Platform) -> list[str]:
    return []


@dataclass(frozen=True)
class Exporter:
    """One `podplan export --format` value.

    build: the files computed in code (placement tables), exactly those named in `built`;
    templates: file -> template rendered with the group's launch context (planner.export.context)
    plus `context(plan, group)`; notes: one line each on what the engine cannot express or run;
    serve_templates: the files that join the groups of a P/D-disaggregated plan into one service.
    """

    name: str
    layer_ids: str  # how its placement files index layers (recorded in manifest.json)
    built: tuple[str, ...] = ()
    build: Callable[[ir.Plan, Group], Files] = _no_files
    templates: Mapping[str, str] = field(default_factory=dict)
    context: Callable[[ir.Plan, Group], dict] = _no_context
    notes: Callable[[ir.Plan, Platform], list[str]] = _no_notes
    # plan-level files of a prefill/decode-disaggregated plan (router, proxy, disaggregated-server
    # config): file at the export's root -> template rendered with planner.export.context.serve_context
    serve_templates: Mapping[str, str] = field(default_factory=dict)

    @property
    def files(self) -> tuple[str, ...]:
        """Every file it writes into a group's folder."""
        return tuple(sorted((*self.built, *self.templates)))

    def write_group(self, plan: ir.Plan, group: Group, ctx: dict) -> Files:
        """The files of one group: built ones, then the rendered templates."""
        files = self.build(plan, group)
        if set(files) != set(self.built):  # an exporter that writes what it does not declare is a bug
            raise AssertionError(f"{self.name} built {sorted(files)}, declared {sorted(self.built)}")
        extra = self.context(plan, group)
        for name, template in self.templates.items():
            files[name] = render(template, {**ctx, **extra})
        return files

    def write_serve(self, ctx: dict) -> Files:
        """The plan-level serving files of a P/D-disaggregated plan."""
        return {name: render(template, ctx) for name, template in self.serve_templates.items()}
