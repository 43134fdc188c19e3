"""Export a plan to serving engines: expert-placement files and launch scripts, one folder per phase shape.

One module per format (sglang, vllm, vllm_ascend, trtllm, eplb), each defining an `Exporter` record;
`registry` lists them, `build.export_plan` runs one over a plan, `folder.write_export` writes it.
"""

from planner.export.build import Export, export_plan
from planner.export.folder import write_export
from planner.export.registry import EXPORTERS, FORMATS, exporter_for

__all__ = ["EXPORTERS", "FORMATS", "Export", "export_plan", "exporter_for", "write_export"]
