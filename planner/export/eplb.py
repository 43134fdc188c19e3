"""EPLB tensors as .npy: phy2log [L, R], log2phy [L, E, X] (-1 padded), logcnt [L, E]. A format, not an engine:
no launch script."""

from __future__ import annotations

from planner.export.exporter import MOE_LAYERS, Exporter, Files
from planner.export.groups import Group, eplb_tensors
from planner.export.render import npy_bytes
from planner.ir import plan as ir


def _tensors(plan: ir.Plan, group: Group) -> Files:
    phy2log, log2phy, logcnt = eplb_tensors(plan, group)
    return {"phy2log.npy": npy_bytes(phy2log), "log2phy.npy": npy_bytes(log2phy), "logcnt.npy": npy_bytes(logcnt)}


EXPORTER = Exporter(
    name="eplb",
    layer_ids=MOE_LAYERS,
    built=("phy2log.npy", "log2phy.npy", "logcnt.npy"),
    build=_tensors,
)
