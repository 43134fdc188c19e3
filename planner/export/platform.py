"""What an export needs to know about the plan's accelerators: NPU or GPU, and how a process picks its devices.

The plan records the hardware by its spec-sheet name (`TopologyInfo.hardware`); `platform_of` finds
that spec (`costmodels.hardware.device_named`) and asks it for its software platform, so exporters
never match on substrings of a name: adding hardware touches costmodels, not exporters.
"""

from __future__ import annotations

from dataclasses import dataclass

from costmodels.errors import InputError
from costmodels.hardware import device_named
from planner.ir import plan as ir
from planner.ir.errors import PlanError


@dataclass(frozen=True)
class Platform:
    """An accelerator family as serving engines see it."""

    name: str  # "npu", "cuda" or "cpu"
    label: str  # for notes: "Ascend NPUs", "NVIDIA GPUs", "CPU processes"
    visible_devices: str  # environment variable naming the devices an engine process sees


NPU = Platform("npu", "Ascend NPUs", "ASCEND_RT_VISIBLE_DEVICES")
CUDA = Platform("cuda", "NVIDIA GPUs", "CUDA_VISIBLE_DEVICES")
CPU = Platform("cpu", "CPU processes", "CUDA_VISIBLE_DEVICES")  # `local:N`: the numerics cluster, no engine

# costmodels.hardware.DeviceSpec.platform -> what an engine process needs to know about it
_BY_PLATFORM = {"ascend": NPU, "cuda": CUDA, "cpu": CPU}


def platform_of(topology: ir.TopologyInfo) -> Platform:
    """The platform of the plan's hardware; a name no spec sheet carries is a PlanError."""
    try:
        spec = device_named(topology.hardware)
    except InputError as exc:
        raise PlanError(f"plan.topology.hardware: {exc}; re-compile the plan") from None
    return _BY_PLATFORM[spec.platform]
