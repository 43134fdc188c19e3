"""The export formats: one Exporter record per engine module, in `podplan export --format` order."""

from __future__ import annotations

from costmodels.errors import InputError
from planner.export import eplb, sglang, trtllm, vllm, vllm_ascend
from planner.export.exporter import Exporter

EXPORTERS: dict[str, Exporter] = {e.name: e for e in (sglang.EXPORTER, vllm.EXPORTER, vllm_ascend.EXPORTER,
                                                      trtllm.EXPORTER, eplb.EXPORTER)}
FORMATS = tuple(EXPORTERS)


def exporter_for(fmt: str) -> Exporter:
    """The exporter of `fmt`; an unknown name is one InputError line naming the known ones."""
    if fmt not in EXPORTERS:
        raise InputError(f"export: unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    return EXPORTERS[fmt]
