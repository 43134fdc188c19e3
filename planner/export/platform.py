"""What an export needs to know about the plan's accelerators: NPU or GPU, and how a process picks its devices.

The plan records the hardware by its spec-sheet name (`TopologyInfo.hardware`); `platform_of` finds
that spec in `costmodels.hardware.DEVICES` and answers from there, so exporters never match on
substrings of a name. (Interim: the platform is a table keyed by the DEVICES key until the
hardware spec carries it as an attribute; adding hardware then touches costmodels, not exporters.)
"""

from __future__ import annotations

from dataclasses import dataclass

from costmodels.errors import PlanError
from costmodels.hardware import DEVICES
from planner.ir import plan as ir


@dataclass(frozen=True)
class Platform:
    """An accelerator family as serving engines see it."""

    name: str  # "npu", "cuda" or "cpu"
    label: str  # for notes: "Ascend NPUs", "NVIDIA GPUs", "CPU processes"
    visible_devices: str  # environment variable naming the devices an engine process sees


NPU = Platform("npu", "Ascend NPUs", "ASCEND_RT_VISIBLE_DEVICES")
CUDA = Platform("cuda", "NVIDIA GPUs", "CUDA_VISIBLE_DEVICES")
CPU = Platform("cpu", "CPU processes", "CUDA_VISIBLE_DEVICES")  # `local:N`: the numerics cluster, no engine

_BY_DEVICE = {"ascend-910c": NPU, "h100": CUDA, "h800": CUDA, "h200": CUDA, "cpu": CPU}


def platform_of(topology: ir.TopologyInfo) -> Platform:
    """The platform of the plan's hardware; a name no spec sheet carries is a PlanError."""
    for key, spec in DEVICES.items():
        if spec.name == topology.hardware:
            return _BY_DEVICE[key]
    known = ", ".join(spec.name for spec in DEVICES.values())
    raise PlanError(f"plan.topology.hardware: {topology.hardware!r} is not hardware this podplan knows "
                    f"({known}); re-compile the plan")
