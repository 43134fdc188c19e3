"""The Plan IR: frozen dataclasses with one canonical JSON form, the contract between compiler, runtime and CI.

A plan says what every device of a topology runs, what the compiler predicted and how it was
made. `Plan.to_json()` is canonical; `load_plan` validates and names the JSON path of the first error.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import numbers
import os
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

from costmodels.errors import PlanError
from planner.ir.fileio import write_atomic

# Readers accept exactly this version; any change to the shipped schema file bumps it (README policy).
SCHEMA_VERSION = 1
# Significant digits kept for every float: enough for ms and tokens/s, short enough to diff.
FLOAT_DIGITS = 6
# Tolerance on "the shares of one expert sum to 1" after rounding to FLOAT_DIGITS.
SHARE_SUM_TOLERANCE = 1e-3

# Weight precisions a plan may name (`podplan compile --quant`), in bytes per parameter.
QUANT_BYTES = {"bf16": 2.0, "fp8": 1.0, "int8": 1.0}
# Facts of the bundled models (config digest, layers, experts, ...) a plan naming one must repeat;
# data, since the IR may not import the frontend (regenerate: python -m planner.model_facts --write).
BUNDLED_FACTS_FILE = Path(__file__).with_name("bundled_models.json")

# Upper bounds on the sizes a plan may claim: far above any real deployment (the largest topology,
# h100-cluster:1024, has 8192 devices), low enough that a crafted plan cannot make `show` loop over
# 10^9 devices or the runtime allocate for 10^6 microbatches. (low, high); low None = no lower bound
# here (the nodes' own checks say "must be > 0").
MAX_DEVICES = 8192
MAX_DIES = MAX_DEVICES * 16
LIMITS: dict[str, dict[str, tuple[int | None, int | float]]] = {
    "ModelInfo": {"num_layers": (None, 1024), "num_routed_experts": (None, 4096), "num_shared_experts": (None, 256),
                  "top_k": (None, 4096), "hidden": (None, 1 << 20), "vocab": (None, 1 << 24)},
    "TopologyInfo": {"num_devices": (None, MAX_DEVICES), "dies_per_device": (None, 16),
                     "devices_per_server": (None, MAX_DEVICES), "servers_per_pod": (None, MAX_DEVICES),
                     "pods": (None, MAX_DEVICES)},
    "Workload": {"input_len": (None, 1 << 24), "output_len": (None, 1 << 24)},
    "Instance": {"microbatches": (None, 64), "batch_per_device": (None, 1 << 20), "attention_dp": (None, MAX_DIES),
                 "attention_tp": (None, MAX_DIES), "ep": (None, MAX_DIES), "dp_domains": (None, MAX_DIES)},
    "ExpertPlacement": {"devices": (None, MAX_DEVICES), "slots_per_device": (None, 4096)},
    "Provenance": {"seed": (0, 2**32 - 1)},  # numpy and the solvers take 32-bit seeds
}

PHASES = ("prefill", "decode")
ROLES = ("attention", "experts", "both")
SCHEMA_FILE = Path(__file__).with_name("schema") / "plan.schema.json"
REGENERATE = "regenerate it with `podplan compile`"

PhaseName = Literal["prefill", "decode"]
Mode = Literal["colocated", "disaggregated"]
StageKind = Literal["dense", "moe"]


class PlanValidationError(PlanError):
    """A value that breaks a plan rule: `rel` is its JSON path below `owner`, `rule` what is wrong."""

    def __init__(self, rel: str, rule: str, owner: str = "plan"):
        self.rel, self.rule, self.owner = rel, rule, owner
        super().__init__(f"{owner}{rel}: {rule}")


def _fail(rel: str, rule: str) -> typing.NoReturn:
    raise PlanValidationError(rel, rule)


# --- coercion: one function types, converts and rounds both Python-built and loaded values ----


def _round(x: float) -> float:
    """Round to FLOAT_DIGITS significant digits (idempotent; -0.0 becomes 0.0)."""
    return float(f"{x:.{FLOAT_DIGITS}g}") + 0.0


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {_short(value)}"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _short(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")


def _key(path: str, key: str) -> str:
    return f"{path}.{key}" if key.isidentifier() else f"{path}[{json.dumps(key)}]"


def _sequence(value: Any, path: str) -> list | tuple:
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
        value = value.tolist()  # numpy arrays from the solvers
    if not isinstance(value, (list, tuple)):
        _fail(path, f"expected a list, got {_kind(value)}")
    return value


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """`value` as type `tp` (ints, rounded floats, tuples, dataclasses), or a PlanValidationError at `path`."""
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            _fail(path, f"expected an integer, got {_kind(value)}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            _fail(path, f"expected a number, got {_kind(value)}")
        try:
            x = float(value)
        except OverflowError:  # a JSON integer with hundreds of digits
            _fail(path, "number too large")
        if not math.isfinite(x):
            _fail(path, f"expected a finite number, got {x}")
        return _round(x)
    if tp is str:
        if not isinstance(value, str):
            _fail(path, f"expected a string, got {_kind(value)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            _fail(path, f"expected true or false, got {_kind(value)}")
        return value
    if tp is Any:
        return _plain(value, path, 0)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            _fail(path, f"expected an object ({tp.__name__}), got {_kind(value)}")
        return _build(tp, value, path)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if not isinstance(value, str) or value not in args:
            _fail(path, f"{_kind(value)} is not one of {', '.join(args)}")
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, path)
    if origin is tuple:
        seq = _sequence(value, path)
        item = args[0]
        if item is int:  # the long slot lists: skip the generic call for plain ints
            return tuple(v if type(v) is int else _coerce(int, v, f"{path}[{i}]") for i, v in enumerate(seq))
        return tuple(_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(seq))
    if origin is dict:
        if not isinstance(value, dict):
            _fail(path, f"expected an object, got {_kind(value)}")
        for k in value:
            if not isinstance(k, str):
                _fail(path, f"object keys must be strings, got {k!r}")
        return {k: _coerce(args[1], value[k], _key(path, k)) for k in sorted(value)}
    raise TypeError(f"plan field type {tp!r} is not supported")  # internal: a new field type


def _plain(value: Any, path: str, depth: int) -> Any:
    """A free-form JSON value (provenance options): scalars, lists, objects; floats rounded."""
    if depth > 8:
        _fail(path, "nested too deeply (options hold at most 8 levels)")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return _coerce(float, value, path)
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value))
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str):
                _fail(path, f"object keys must be strings, got {k!r}")
        return {k: _plain(value[k], _key(path, k), depth + 1) for k in sorted(value)}
    _fail(path, f"expected a JSON value, got {_kind(value)}")


_HINTS: dict[type, dict[str, Any]] = {}


def _fields(cls: type) -> dict[str, Any]:
    """Field name -> resolved type hint, in declaration order (cached)."""
    hints = _HINTS.get(cls)
    if hints is None:
        resolved = typing.get_type_hints(cls)
        hints = _HINTS[cls] = {f.name: resolved[f.name] for f in dataclasses.fields(cls)}
    return hints


def _required(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


def _build(cls: type, obj: dict, path: str) -> Any:
    """Construct dataclass `cls` from a JSON object, naming unknown and missing keys by path."""
    names = _fields(cls)
    for key in obj:
        if key not in names:
            _fail(_key(path, str(key)), f"unknown field (a {cls.__name__} has {', '.join(names)})")
    for name in _required(cls):
        if name not in obj:
            _fail(_key(path, name), f"missing required field of {cls.__name__}")
    try:
        return cls(**obj)
    except PlanValidationError as exc:
        raise PlanValidationError(path + exc.rel, exc.rule) from None


class _Node:
    """Base of every plan dataclass: coerce fields by their type hints, then check invariants."""

    def __post_init__(self) -> None:
        try:
            for name, tp in _fields(type(self)).items():
                object.__setattr__(self, name, _coerce(tp, getattr(self, name), "." + name))
            _check_limits(self)  # before _check, whose loops and tables grow with these sizes
            self._check()
        except PlanValidationError as exc:
            raise PlanValidationError(exc.rel, exc.rule, type(self).__name__) from None

    def _check(self) -> None:
        """Invariants of this node alone (cross-node rules live in Plan._check)."""

    def to_dict(self) -> dict:
        """Plain JSON-ready dict: every field, tuples as lists, keys in canonical (sorted) order."""
        return {name: _plain_out(getattr(self, name)) for name in sorted(_fields(type(self)))}


def _check_limits(node: _Node) -> None:
    """The node's sizes within LIMITS."""
    for name, (low, high) in LIMITS.get(type(node).__name__, {}).items():
        value = getattr(node, name)
        if low is not None and value < low:
            _fail(f".{name}", f"{value} must be >= {low}")
        if value > high:
            _fail(f".{name}", f"{value} exceeds the limit {high:g}; no deployment podplan plans is this large")


def _plain_out(value: Any) -> Any:
    if isinstance(value, _Node):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain_out(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain_out(value[k]) for k in sorted(value)}
    return value


def _positive(rel: str, value: float, what: str = "must be > 0") -> None:
    if value <= 0:
        _fail(rel, f"{value} {what}")


def _unique(rel: str, ids: tuple[int, ...], what: str) -> None:
    seen: set[int] = set()
    for i, d in enumerate(ids):
        if d < 0:
            _fail(f"{rel}[{i}]", f"{what} {d} is negative")
        if d in seen:
            _fail(f"{rel}[{i}]", f"{what} {d} listed twice")
        seen.add(d)


# --- the plan -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo(_Node):
    """The model a plan was compiled for: identity (config hash) and architecture summary."""

    name: str
    config_sha256: str  # sha256 of the canonical config.json (planner.frontend.zoo.ModelSource.digest)
    attention: str  # "mla" or "gqa"
    num_layers: int
    moe_layers: tuple[int, ...]  # decoder layers whose FFN is a MoE block, ascending
    hidden: int
    vocab: int
    num_routed_experts: int
    num_shared_experts: int
    top_k: int
    params_total: int
    params_active: int
    expert_bytes: int  # one routed expert of one layer at the plan's weight precision (migration unit)

    def _check(self) -> None:
        if len(self.config_sha256) != 64 or any(c not in "0123456789abcdef" for c in self.config_sha256):
            _fail(".config_sha256", "expected 64 lowercase hex digits (a sha256)")
        for name in ("num_layers", "hidden", "vocab", "num_routed_experts", "top_k", "params_total"):
            _positive(f".{name}", getattr(self, name))
        if self.num_shared_experts < 0:
            _fail(".num_shared_experts", f"{self.num_shared_experts} must be >= 0")
        if self.top_k > self.num_routed_experts:
            _fail(".top_k", f"{self.top_k} exceeds the {self.num_routed_experts} routed experts")
        if not 0 < self.params_active <= self.params_total:
            _fail(".params_active", f"{self.params_active} must be in 1..params_total ({self.params_total})")
        if self.expert_bytes <= 0:
            _fail(".expert_bytes", f"{self.expert_bytes} must be > 0")
        if not self.moe_layers:
            _fail(".moe_layers", "empty: podplan plans MoE models, which have at least one MoE layer")
        for i, layer in enumerate(self.moe_layers):
            if not 0 <= layer < self.num_layers:
                _fail(f".moe_layers[{i}]", f"layer {layer} out of range 0..{self.num_layers - 1}")
            if i and layer <= self.moe_layers[i - 1]:
                _fail(f".moe_layers[{i}]", f"layer {layer} after {self.moe_layers[i - 1]}: must be strictly ascending")

    @classmethod
    def from_shape(cls, shape: Any, config_sha256: str, weight_bytes: float) -> ModelInfo:
        """From a costmodels ModelShape; `weight_bytes` per parameter (2 for bf16, 1 for int8)."""
        return cls(
            name=shape.name, config_sha256=config_sha256, attention=shape.attention, num_layers=shape.num_layers,
            moe_layers=tuple(shape.moe_layers), hidden=shape.hidden, vocab=shape.vocab,
            num_routed_experts=shape.num_routed_experts, num_shared_experts=shape.num_shared_experts,
            top_k=shape.top_k, params_total=shape.params_total, params_active=shape.params_active,
            expert_bytes=max(1, round(shape.params_expert * weight_bytes)),
        )


@dataclass(frozen=True)
class TopologyInfo(_Node):
    """The cluster: devices (NPU chips / GPUs / processes) of `dies_per_device` dies, in servers and pods.

    Device d sits in server d // devices_per_server, pod d // (devices_per_server * servers_per_pod).
    """

    name: str  # e.g. "cloudmatrix384", "h100-cluster:2", "local:8"
    kind: str
    params: dict[str, int]
    sha256: str  # costmodels.topology.Topology.digest(): pins the exact topology
    hardware: str
    num_devices: int
    dies_per_device: int
    devices_per_server: int
    servers_per_pod: int
    pods: int
    memory_gb_per_device: float

    def _check(self) -> None:
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            _fail(".sha256", "expected 64 lowercase hex digits (a sha256)")
        for name in ("num_devices", "dies_per_device", "devices_per_server", "servers_per_pod", "pods",
                     "memory_gb_per_device"):
            _positive(f".{name}", getattr(self, name))
        product = self.devices_per_server * self.servers_per_pod * self.pods
        if product != self.num_devices:
            _fail(".num_devices", f"{self.num_devices} != devices_per_server x servers_per_pod x pods = {product}")

    def server_of(self, device: int) -> int:
        return device // self.devices_per_server

    def pod_of(self, device: int) -> int:
        return device // (self.devices_per_server * self.servers_per_pod)

    @classmethod
    def from_topology(cls, topo: Any) -> TopologyInfo:
        """From a costmodels Topology."""
        return cls(
            name=topo.name, kind=topo.kind, params=dict(topo.params), sha256=topo.digest(),
            hardware=topo.hardware.name, num_devices=topo.num_devices, dies_per_device=topo.dies_per_device,
            devices_per_server=topo.devices_per_server, servers_per_pod=topo.servers_per_pod, pods=topo.pods,
            memory_gb_per_device=topo.hardware.chip_hbm_gb,
        )


@dataclass(frozen=True)
class Workload(_Node):
    """What the plan serves: request shape, precision, MTP, and the SLOs it was searched under."""

    input_len: int
    output_len: int
    prefix_hit: float = 0.0  # share of each prompt already in the prefix cache
    quant: str = "bf16"  # weight precision: bf16, fp8, int8
    mtp_accept: float = 0.0  # MTP draft acceptance (0 = no MTP)
    tpot_slo_ms: float | None = None
    ttft_slo_ms: float | None = None

    def _check(self) -> None:
        _positive(".input_len", self.input_len)
        _positive(".output_len", self.output_len)
        if not 0 <= self.prefix_hit < 1:
            _fail(".prefix_hit", f"{self.prefix_hit} must be in [0, 1)")
        if not 0 <= self.mtp_accept <= 1:
            _fail(".mtp_accept", f"{self.mtp_accept} must be in [0, 1]")
        for name in ("tpot_slo_ms", "ttft_slo_ms"):
            if getattr(self, name) is not None:
                _positive(f".{name}", getattr(self, name))


@dataclass(frozen=True)
class Stage(_Node):
    """One decoder layer as a pipeline of stages: attention, then its FFN (dense or MoE) across a cut."""

    layer: int
    kind: StageKind
    roles: tuple[str, ...]  # module roles in the layer (attention, moe_gate, routed_experts, ...)
    params: int
    flops_per_token: float
    a2e_bytes_per_token: float  # attention -> FFN across the cut (0 for dense layers: no cut)
    e2a_bytes_per_token: float  # FFN -> attention

    def _check(self) -> None:
        if self.params < 0 or self.flops_per_token < 0:
            _fail(".params", "params and flops_per_token must be >= 0")
        if self.a2e_bytes_per_token < 0 or self.e2a_bytes_per_token < 0:
            _fail(".a2e_bytes_per_token", "cut bytes must be >= 0")


@dataclass(frozen=True)
class Instance(_Node):
    """One serving instance of a phase: its devices and how attention and experts are laid out on them.

    `devices` lists the instance's devices in rank order. colocated: every device runs attention and
    holds routed expert slots or computes the shared experts (role "both"); disaggregated: attention
    devices and expert devices are disjoint (roles "attention" / "experts"). Expert slot s of the
    placement lives on expert_devices[s // S]. Parallel degrees count dies: attention_dp x attention_tp
    = dies of the attention devices; ep = dies of the expert and shared-expert devices.
    """

    id: str  # unique in the plan, e.g. "prefill-0", "decode-0"
    mode: Mode
    devices: tuple[int, ...]
    attention_devices: tuple[int, ...]
    expert_devices: tuple[int, ...]  # order = expert rank order (slot s on expert_devices[s // S])
    attention_dp: int
    attention_tp: int
    ep: int
    microbatches: int
    batch_per_device: float  # decode: sequences in flight per attention device; prefill: tokens per device
    experts: int = 0  # index into the phase's `experts` (the expert placement this instance uses)
    dp_domains: int = 1  # disaggregated: attention DP domains taking turns on the expert devices
    shared_expert_devices: tuple[int, ...] = ()  # devices that compute the shared experts

    def _check(self) -> None:
        if not self.id:
            _fail(".id", "empty instance id")
        for name in ("devices", "attention_devices", "expert_devices", "shared_expert_devices"):
            _unique(f".{name}", getattr(self, name), "device")
        if not self.devices:
            _fail(".devices", "an instance needs at least one device")
        if not self.attention_devices:
            _fail(".attention_devices", "an instance needs at least one attention device")
        if not self.expert_devices:
            _fail(".expert_devices", "an instance needs at least one expert device")
        members = set(self.devices)
        for name in ("attention_devices", "expert_devices", "shared_expert_devices"):
            for i, d in enumerate(getattr(self, name)):
                if d not in members:
                    _fail(f".{name}[{i}]", f"device {d} is not in the instance's devices")
        attention, experts = set(self.attention_devices), set(self.expert_devices)
        shared = set(self.shared_expert_devices)
        for i, d in enumerate(self.devices):
            if d not in attention and d not in experts and d not in shared:
                _fail(f".devices[{i}]", f"device {d} has no role: list it in attention_devices or expert_devices")
        # colocated: attention everywhere; every device holds routed slots or computes the shared experts
        # (CloudMatrix-Infer decode: 288 dies of routed slots + 32 dies of shared-expert replicas)
        if self.mode == "colocated" and not (attention == members and experts | shared == members):
            _fail(".mode", "colocated: every device must run attention and hold experts (or use disaggregated)")
        if self.mode == "disaggregated":
            both = sorted(attention & experts)
            if both:
                _fail(".mode", f"disaggregated: device {both[0]} is both an attention and an expert device")
        for name in ("attention_dp", "attention_tp", "ep", "microbatches", "batch_per_device", "dp_domains"):
            _positive(f".{name}", getattr(self, name))
        if self.experts < 0:
            _fail(".experts", f"placement index {self.experts} is negative")
        if self.dp_domains > self.attention_dp:
            _fail(".dp_domains", f"{self.dp_domains} domains exceed attention_dp {self.attention_dp}")

    def role_of(self, device: int) -> str:
        """'attention', 'experts' or 'both' for a device of this instance."""
        a = device in self.attention_devices
        e = device in self.expert_devices or device in self.shared_expert_devices
        if a and e:
            return "both"
        if a:
            return "attention"
        if e:
            return "experts"
        raise KeyError(f"device {device} is not in instance {self.id}")

    @property
    def af_ratio(self) -> float | None:
        """Attention devices per expert device when disaggregated (None when colocated)."""
        if self.mode != "disaggregated":
            return None
        return len(self.attention_devices) / len(self.expert_devices)


@dataclass(frozen=True)
class LayerPlacement(_Node):
    """Expert placement of one MoE layer: the logical expert in each physical slot.

    phy2log: [slots] expert id per slot; shares: [slots] fraction of the slot's expert's tokens
    sent to that slot (each expert's shares sum to 1; absent = equal split over replicas);
    device_loads: [expert devices] predicted tokens per step (only ratios matter).
    """

    layer: int
    phy2log: tuple[int, ...]
    shares: tuple[float, ...] | None = None
    device_loads: tuple[float, ...] | None = None

    def _check(self) -> None:
        for i, e in enumerate(self.phy2log):
            if e < 0:
                _fail(f".phy2log[{i}]", f"expert {e} is negative")
        if self.shares is not None:
            if len(self.shares) != len(self.phy2log):
                _fail(".shares", f"{len(self.shares)} shares for {len(self.phy2log)} slots: give one per slot")
            total: dict[int, float] = {}
            for i, (e, s) in enumerate(zip(self.phy2log, self.shares)):
                if not 0 <= s <= 1:
                    _fail(f".shares[{i}]", f"share {s} out of range [0, 1]")
                total[e] = total.get(e, 0.0) + s
            for e in sorted(total):
                if abs(total[e] - 1) > SHARE_SUM_TOLERANCE:
                    _fail(".shares", f"the shares of expert {e} sum to {total[e]:.6g}, not 1")
        if self.device_loads is not None:
            for i, x in enumerate(self.device_loads):
                if x < 0:
                    _fail(f".device_loads[{i}]", f"load {x} is negative")

    def log2phy(self) -> dict[int, tuple[int, ...]]:
        """Expert id -> its slots, ascending."""
        out: dict[int, list[int]] = {}
        for s, e in enumerate(self.phy2log):
            out.setdefault(e, []).append(s)
        return {e: tuple(out[e]) for e in sorted(out)}

    @property
    def balance(self) -> float | None:
        """max / mean device load (1.0 = perfect); None without loads."""
        if not self.device_loads:
            return None
        mean = sum(self.device_loads) / len(self.device_loads)
        return max(self.device_loads) / mean if mean > 0 else 1.0


@dataclass(frozen=True)
class ExpertPlacement(_Node):
    """Expert placement of every MoE layer over `devices` expert devices of `slots_per_device` slots.

    Instances refer to it by index, so instances of one shape share one placement. Slot s lives on
    expert device s // slots_per_device; on multi-die devices a device's slots split evenly over its
    dies in order. `layers` follows ModelInfo.moe_layers.
    """

    devices: int
    slots_per_device: int
    layers: tuple[LayerPlacement, ...]
    algorithm: str = ""  # what produced it: "ilp", "eplb", ...

    def _check(self) -> None:
        _positive(".devices", self.devices)
        _positive(".slots_per_device", self.slots_per_device)
        slots = self.slots
        for i, lp in enumerate(self.layers):
            if len(lp.phy2log) != slots:
                _fail(f".layers[{i}].phy2log", f"{len(lp.phy2log)} slots, expected devices x slots_per_device = {slots}")
            if lp.device_loads is not None and len(lp.device_loads) != self.devices:
                _fail(f".layers[{i}].device_loads", f"{len(lp.device_loads)} loads for {self.devices} expert devices")

    @property
    def slots(self) -> int:
        return self.devices * self.slots_per_device

    @property
    def weighted(self) -> bool:
        return any(lp.shares is not None for lp in self.layers)

    def device_of_slot(self, slot: int) -> int:
        """Index into the instance's expert_devices."""
        return slot // self.slots_per_device


@dataclass(frozen=True)
class Prediction(_Node):
    """What the cost model predicts for a phase. ms; throughput in tokens/s per device of the phase."""

    step_ms: float
    throughput_per_device: float  # decode: output tokens/s; prefill: prompt tokens/s
    breakdown: dict[str, float]  # stage -> ms per step (attention, dispatch, experts, combine, ...)
    tpot_ms: float | None = None  # decode
    ttft_ms: float | None = None  # prefill
    feasible: bool = True
    infeasible_reason: str = ""

    def _check(self) -> None:
        if self.step_ms < 0 or self.throughput_per_device < 0:
            _fail(".step_ms", "times and throughput must be >= 0")
        for k, v in self.breakdown.items():
            if v < 0 and k != "overlap":  # overlap: time hidden by microbatching, the one negative term
                _fail(_key(".breakdown", k), f"{v} ms is negative")
        if self.feasible == bool(self.infeasible_reason):
            _fail(".infeasible_reason", "give a reason exactly when feasible is false")


@dataclass(frozen=True)
class MemoryUse(_Node):
    """Memory of the fullest device of one role: GB used by kind (weights, kv, workspace) and capacity."""

    used_gb: float
    capacity_gb: float
    breakdown: dict[str, float]

    def _check(self) -> None:
        _positive(".capacity_gb", self.capacity_gb)
        if self.used_gb < 0:
            _fail(".used_gb", f"{self.used_gb} GB is negative")

    @property
    def feasible(self) -> bool:
        return self.used_gb <= self.capacity_gb


@dataclass(frozen=True)
class Phase(_Node):
    """One phase (prefill or decode): its instances, their expert placements, predictions, memory."""

    instances: tuple[Instance, ...]
    experts: tuple[ExpertPlacement, ...]
    predictions: Prediction
    memory: dict[str, MemoryUse]  # device role -> memory of its fullest device

    def _check(self) -> None:
        if not self.instances:
            _fail(".instances", "a phase needs at least one instance")
        used = set()
        for i, inst in enumerate(self.instances):
            if inst.experts >= len(self.experts):
                _fail(f".instances[{i}].experts", f"placement {inst.experts} out of range 0..{len(self.experts) - 1}")
            placement = self.experts[inst.experts]
            if placement.devices != len(inst.expert_devices):
                _fail(f".instances[{i}].expert_devices",
                      f"{len(inst.expert_devices)} expert devices but experts[{inst.experts}] spans {placement.devices}")
            used.add(inst.experts)
        for j in range(len(self.experts)):
            if j not in used:
                _fail(f".experts[{j}]", "no instance uses this placement: drop it")
        roles = {inst.role_of(d) for inst in self.instances for d in inst.devices}
        for role in self.memory:
            if role not in ROLES:
                _fail(_key(".memory", role), f"unknown role (roles: {', '.join(ROLES)})")
        for role in sorted(roles):
            if role not in self.memory:
                _fail(".memory", f"no entry for role '{role}', which devices of this phase have")
        if self.predictions.feasible:
            for role in sorted(self.memory):
                use = self.memory[role]
                if not use.feasible:
                    _fail(f".memory.{role}.used_gb",
                          f"{use.used_gb} GB exceeds capacity {use.capacity_gb} GB but predictions.feasible is true")

    @property
    def devices(self) -> list[int]:
        return sorted(d for inst in self.instances for d in inst.devices)

    @property
    def feasible(self) -> bool:
        return self.predictions.feasible and all(m.feasible for m in self.memory.values())


@dataclass(frozen=True)
class FrontierPoint(_Node):
    """A configuration the search kept on the throughput-per-device vs TPOT Pareto frontier."""

    phase: PhaseName
    throughput_per_device: float
    config: str  # one-line summary, e.g. "colocated EP320 DP320 TP1 batch 96 mb 2"
    tpot_ms: float | None = None
    ttft_ms: float | None = None
    feasible: bool = True
    chosen: bool = False

    def _check(self) -> None:
        if self.throughput_per_device < 0:
            _fail(".throughput_per_device", "must be >= 0")


@dataclass(frozen=True)
class SolverRun(_Node):
    """One solve the compiler made: what, with which solver, its status, objective, bound and gap."""

    name: str  # e.g. "search decode", "balance decode layer 3"
    solver: str  # "cp-sat", "eplb", "enumerate", ...
    status: str  # "OPTIMAL", "FEASIBLE", "HEURISTIC", ...
    objective: float | None = None
    bound: float | None = None
    gap: float | None = None  # relative: (objective - bound) / objective


@dataclass(frozen=True)
class Provenance(_Node):
    """How the plan was made. No timestamps or wall times: same inputs give the same bytes."""

    podplan_version: str
    seed: int
    options: dict[str, Any]  # the options the compiler ran with (JSON values)
    solvers: tuple[SolverRun, ...] = ()


@dataclass(frozen=True)
class Plan(_Node):
    """A deployment plan: model, topology, workload, stages, prefill/decode phases, frontier, provenance."""

    model: ModelInfo
    topology: TopologyInfo
    workload: Workload
    stages: tuple[Stage, ...]  # one per decoder layer, by layer
    provenance: Provenance
    prefill: Phase | None = None
    decode: Phase | None = None
    frontier: tuple[FrontierPoint, ...] = ()
    schema_version: int = SCHEMA_VERSION

    def _check(self) -> None:
        _check_version(self.schema_version)
        if self.prefill is None and self.decode is None:
            _fail(".decode", "a plan needs a prefill or a decode phase")
        self._check_stages()
        ids: set[str] = set()
        for name, phase in self.phases.items():
            # a device serves one instance per phase; prefill and decode may share devices
            self._check_phase(name, phase, {}, ids)
        for name in PHASES:
            chosen = [i for i, p in enumerate(self.frontier) if p.phase == name and p.chosen]
            if len(chosen) > 1:
                _fail(f".frontier[{chosen[1]}].chosen", f"two chosen {name} points; mark one")

    def _check_stages(self) -> None:
        m = self.model
        if len(self.stages) != m.num_layers:
            _fail(".stages", f"{len(self.stages)} stages for {m.num_layers} layers: give one per layer")
        moe = set(m.moe_layers)
        for i, st in enumerate(self.stages):
            if st.layer != i:
                _fail(f".stages[{i}].layer", f"layer {st.layer} at position {i}: list layers in order")
            if (st.kind == "moe") != (i in moe):
                _fail(f".stages[{i}].kind", f"'{st.kind}' disagrees with model.moe_layers")

    def _check_phase(self, name: str, phase: Phase, owner: dict[int, str], ids: set[str]) -> None:
        m, t = self.model, self.topology
        base = f".{name}"
        p = phase.predictions
        if name == "decode" and p.tpot_ms is None:
            _fail(f"{base}.predictions.tpot_ms", "a decode phase predicts TPOT")
        if name == "prefill" and p.ttft_ms is None:
            _fail(f"{base}.predictions.ttft_ms", "a prefill phase predicts TTFT")
        for i, inst in enumerate(phase.instances):
            at = f"{base}.instances[{i}]"
            if inst.id in ids:
                _fail(f"{at}.id", f"instance id '{inst.id}' used twice")
            ids.add(inst.id)
            for j, d in enumerate(inst.devices):
                if d >= t.num_devices:
                    _fail(f"{at}.devices[{j}]", f"device {d} out of range 0..{t.num_devices - 1} of {t.name}")
                if d in owner:
                    _fail(f"{at}.devices[{j}]", f"device {d} already belongs to instance {owner[d]}")
                owner[d] = inst.id
            dies = t.dies_per_device
            attn = len(inst.attention_devices) * dies
            if inst.attention_dp * inst.attention_tp != attn:
                _fail(f"{at}.attention_dp", f"attention_dp x attention_tp = {inst.attention_dp * inst.attention_tp}, "
                      f"but the attention devices have {attn} dies")
            # EP counts every die in the all-to-all: routed-slot dies and dedicated shared-expert dies
            ep_dies = len(set(inst.expert_devices) | set(inst.shared_expert_devices)) * dies
            if inst.ep != ep_dies:
                _fail(f"{at}.ep", f"ep {inst.ep} != dies of the expert and shared-expert devices ({ep_dies})")
            if m.num_shared_experts and not inst.shared_expert_devices:
                _fail(f"{at}.shared_expert_devices", f"{m.name} has shared experts: name the devices that run them")
            if not m.num_shared_experts and inst.shared_expert_devices:
                _fail(f"{at}.shared_expert_devices", f"{m.name} has no shared experts: leave this empty")
        for k, placement in enumerate(phase.experts):
            self._check_placement(f"{base}.experts[{k}]", placement)

    def _check_placement(self, at: str, placement: ExpertPlacement) -> None:
        m = self.model
        got = tuple(lp.layer for lp in placement.layers)
        if got != m.moe_layers:
            _fail(f"{at}.layers", f"covers layers {_ranges(got) or 'none'}, expected the MoE layers {_ranges(m.moe_layers)}")
        n = m.num_routed_experts
        if placement.slots < n:
            _fail(f"{at}.slots_per_device", f"{placement.slots} slots cannot hold {n} experts")
        for i, lp in enumerate(placement.layers):
            seen = bytearray(n)
            for s, e in enumerate(lp.phy2log):
                if e >= n:
                    _fail(f"{at}.layers[{i}].phy2log[{s}]", f"expert {e} out of range 0..{n - 1}")
                seen[e] = 1
            if not all(seen):
                _fail(f"{at}.layers[{i}].phy2log", f"expert {seen.index(0)} has no slot: every expert needs a replica")

    # --- derived views --------------------------------------------------------------------------

    @property
    def phases(self) -> dict[str, Phase]:
        """Present phases by name, prefill first."""
        return {n: p for n, p in (("prefill", self.prefill), ("decode", self.decode)) if p is not None}

    @property
    def feasible(self) -> bool:
        return all(p.feasible for p in self.phases.values())

    def instances(self) -> list[tuple[str, Instance]]:
        return [(name, inst) for name, phase in self.phases.items() for inst in phase.instances]

    def placement_of(self, phase: str, instance: Instance) -> ExpertPlacement:
        return self.phases[phase].experts[instance.experts]

    def to_json(self) -> str:
        """The canonical form: sorted keys, rounded floats, scalar lists on one line, trailing newline."""
        return _dump(self.to_dict(), 0) + "\n"

    def digest(self) -> str:
        """sha256 of the canonical JSON."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()


def _check_version(version: int) -> None:
    if version == SCHEMA_VERSION:
        return
    if version > SCHEMA_VERSION:
        _fail(".schema_version", f"{version} is newer than this podplan reads ({SCHEMA_VERSION}); upgrade podplan")
    _fail(".schema_version", f"{version} is older than this podplan reads ({SCHEMA_VERSION}); {REGENERATE}")


# --- the per-device view ------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceAssignment:
    """What one device runs in one phase. Idle devices have phase/instance/rank None and role 'idle'.

    slots: instance-relative physical slots on the device (the same in every MoE layer);
    experts: per MoE layer (ModelInfo.moe_layers order), the logical expert of each slot;
    loads: per MoE layer, device load / mean load of the instance's expert devices (() if unknown).
    """

    device: int
    server: int
    pod: int
    phase: str | None
    instance: str | None
    rank: int | None  # position in the instance's devices
    role: str  # "attention", "experts", "both" or "idle"
    layers: tuple[int, ...]  # decoder layers it runs: all for attention roles, MoE layers for experts
    shared_experts: bool
    slots: tuple[int, ...]
    experts: tuple[tuple[int, ...], ...]
    loads: tuple[float, ...]

    @property
    def mean_load(self) -> float | None:
        return sum(self.loads) / len(self.loads) if self.loads else None


def devices_of(plan: Plan) -> list[DeviceAssignment]:
    """What every device of the topology runs, ordered by device id then phase (prefill first).

    A device serving both phases (prefill and decode sharing devices) appears twice, once per phase;
    an idle device appears once with role 'idle'.
    """
    t, m = plan.topology, plan.model
    out: dict[int, list[DeviceAssignment]] = {}
    for phase_name, inst in plan.instances():
        placement = plan.placement_of(phase_name, inst)
        spd = placement.slots_per_device
        means = [_mean(lp.device_loads) for lp in placement.layers]
        expert_rank = {d: k for k, d in enumerate(inst.expert_devices)}
        shared = set(inst.shared_expert_devices)
        for rank, d in enumerate(inst.devices):
            role = inst.role_of(d)
            k = expert_rank.get(d)
            slots = tuple(range(k * spd, (k + 1) * spd)) if k is not None else ()
            experts = tuple(lp.phy2log[k * spd:(k + 1) * spd] for lp in placement.layers) if k is not None else ()
            loads: tuple[float, ...] = ()
            rows = [lp.device_loads for lp in placement.layers]
            if k is not None and all(rows):
                loads = tuple(r[k] / mu if mu > 0 else 1.0 for r, mu in zip(rows, means) if r)
            layers = tuple(range(m.num_layers)) if role != "experts" else m.moe_layers
            out.setdefault(d, []).append(DeviceAssignment(
                d, t.server_of(d), t.pod_of(d), phase_name, inst.id, rank, role, layers, d in shared, slots,
                experts, loads))
    result = []
    for d in range(t.num_devices):
        result += out.get(d) or [DeviceAssignment(d, t.server_of(d), t.pod_of(d), None, None, None, "idle", (),
                                                  False, (), (), ())]
    return result


def _mean(xs: tuple[float, ...] | None) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _ranges(ids: typing.Iterable[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8' (sorted, deduplicated)."""
    xs = sorted(set(ids))
    parts, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        parts.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(parts)


device_ranges = _ranges


# --- JSON in and out ----------------------------------------------------------------------------


def _dump(value: Any, indent: int) -> str:
    """Canonical JSON: objects one key a line (sorted), lists of scalars on one line."""
    pad, inner = " " * indent, " " * (indent + 1)
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = [f"{inner}{json.dumps(k)}: {_dump(value[k], indent + 1)}" for k in sorted(value)]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(value, list):
        if not value:
            return "[]"
        if all(not isinstance(v, (dict, list)) for v in value):
            return "[" + ", ".join(json.dumps(v) for v in value) + "]"
        return "[\n" + ",\n".join(inner + _dump(v, indent + 1) for v in value) + "\n" + pad + "]"
    return json.dumps(value)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {json.dumps(k)}")
        out[k] = v
    return out


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


# --- consistency with the world outside the file: bundled model facts, topology, known dtypes ----


@functools.lru_cache(maxsize=1)
def _bundled_facts() -> dict[str, dict]:
    return json.loads(BUNDLED_FACTS_FILE.read_text())


def check_consistency(plan: Plan) -> None:
    """A plan must not contradict what its names mean: PlanValidationError naming the JSON path.

    Each field is valid alone, but a plan can still lie: a bundled model with an expert removed (its
    placement then covers every expert it claims, and an export loses one), a local:8 topology with
    16 devices, an unknown precision. The loader runs this on every file it reads.
    """
    _check_quant(plan)
    _check_topology_name(plan)
    _check_bundled_model(plan)


def _check_quant(plan: Plan) -> None:
    quant = plan.workload.quant
    if quant not in QUANT_BYTES:
        _fail(".workload.quant", f"{_kind(quant)} is not one of {', '.join(QUANT_BYTES)}")


def _check_topology_name(plan: Plan) -> None:
    """The topology name resolves, and the plan's copy of its facts matches what it resolves to."""
    from costmodels.errors import TopologyError
    from costmodels.topology import get_topology

    t = plan.topology
    try:
        topo = get_topology(t.name)
    except TopologyError as exc:
        _fail(".topology.name", str(exc).splitlines()[0])
    if topo.name != t.name:
        _fail(".topology.name", f"{_short(t.name)} is not written the way podplan writes it ({_short(topo.name)}); "
                                f"{REGENERATE}")
    want = {"kind": topo.kind, "params": dict(topo.params), "hardware": topo.hardware.name,
            "num_devices": topo.num_devices, "dies_per_device": topo.dies_per_device,
            "devices_per_server": topo.devices_per_server, "servers_per_pod": topo.servers_per_pod,
            "pods": topo.pods, "memory_gb_per_device": _round(topo.hardware.chip_hbm_gb)}
    for field, value in want.items():
        got = getattr(t, field)
        if got != value:
            _fail(f".topology.{field}", f"{got!r}, but {t.name} has {value!r}; the plan contradicts its topology")


def _check_bundled_model(plan: Plan) -> None:
    """A plan naming a bundled model holds that model's digest and facts (user configs: see the runtime)."""
    m = plan.model
    facts = _bundled_facts().get(m.name)
    if facts is None:
        return
    if m.config_sha256 != facts["config_sha256"]:
        _fail(".model.config_sha256", f"not the digest of the bundled {m.name} config; a plan naming a bundled "
                                      f"model is compiled from it: {REGENERATE}")
    for field in ("attention", "num_layers", "moe_layers", "hidden", "vocab", "num_routed_experts",
                  "num_shared_experts", "top_k", "params_total", "params_active"):
        got, want = getattr(m, field), facts[field]
        if field == "moe_layers":
            got, want = _ranges(got), _ranges(want)
        if got != want:
            _fail(f".model.{field}", f"{got} but the bundled {m.name} has {want}; the plan contradicts its model")
    want_bytes = max(1, round(facts["params_expert"] * QUANT_BYTES[plan.workload.quant]))
    if m.expert_bytes != want_bytes:
        _fail(".model.expert_bytes", f"{m.expert_bytes} but one {m.name} expert at {plan.workload.quant} is "
                                     f"{want_bytes} bytes; the plan contradicts its model")


def from_dict(obj: Any) -> Plan:
    """Validate a decoded JSON document into a Plan; errors name the JSON path ('plan.decode...')."""
    if not isinstance(obj, dict):
        _fail("", f"expected a JSON object, got {_kind(obj)}")
    version = obj.get("schema_version")
    if version is None:
        _fail(".schema_version", f"missing: not a podplan plan (this podplan reads version {SCHEMA_VERSION})")
    version = _coerce(int, version, ".schema_version")
    _check_version(version)  # before any field, so a newer file says so rather than "unknown field"
    plan = _build(Plan, obj, "")
    check_consistency(plan)
    return plan


def from_json(text: str) -> Plan:
    """Parse and validate the JSON text of a plan."""
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise PlanError(f"malformed JSON at line {exc.lineno} column {exc.colno} ({exc.msg}); {REGENERATE}") from None
    except (ValueError, RecursionError) as exc:
        raise PlanError(f"malformed JSON ({exc or 'nested too deeply'}); {REGENERATE}") from None
    try:
        return from_dict(obj)
    except PlanValidationError as exc:
        raise PlanError(f"plan{exc.rel}: {exc.rule}") from None


def load_plan(path: str | os.PathLike[str]) -> Plan:
    """Read and validate a plan file; any problem is one PlanError line naming the file and JSON path."""
    shown = str(path)
    p = Path(path)
    if not p.exists():
        raise PlanError(f"{shown}: no such plan file; give the path of a plan written by `podplan compile`")
    if p.is_dir():
        raise PlanError(f"{shown}: is a directory, not a plan file; give the path of a plan .json")
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise PlanError(f"{shown}: cannot read the plan ({exc.strerror}); check the file's permissions") from None
    except UnicodeDecodeError:
        raise PlanError(f"{shown}: not UTF-8 text, so not a plan file; {REGENERATE}") from None
    try:
        return from_json(text)
    except PlanError as exc:
        raise PlanError(f"{shown}: {exc}") from None


def write_plan(plan: Plan, path: str | os.PathLike[str]) -> None:
    """Write the canonical JSON atomically (temp file + rename: an interrupted write leaves no file)."""
    if not isinstance(plan, Plan):
        raise TypeError(f"write_plan needs a Plan, got {type(plan).__name__}")
    write_atomic(path, plan.to_json())


# --- JSON Schema (generated from the dataclasses; the shipped file is tested to be up to date) -----


def json_schema() -> dict:
    """A JSON Schema (draft 2020-12) for the plan's structure; value rules live in the classes' checks."""
    defs: dict[str, dict] = {}
    root = _schema_of(Plan, defs)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://podplan.dev/schema/plan-v{SCHEMA_VERSION}.json",
        "title": f"podplan plan, schema_version {SCHEMA_VERSION}",
        "description": "Structure only; cross-field rules (ranges, slot counts, device ownership) are "
                       "checked by planner.ir.plan.load_plan.",
        **root,
        "$defs": defs,
    }


def _schema_of(tp: Any, defs: dict[str, dict]) -> dict:
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"type": "number"}
    if tp is str:
        return {"type": "string"}
    if tp is bool:
        return {"type": "boolean"}
    if tp is Any:
        return {}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        name = tp.__name__
        if name not in defs:
            defs[name] = {}  # reserve first: recursion
            props = {n: _schema_of(h, defs) for n, h in _fields(tp).items()}
            if tp is Plan:
                props["schema_version"] = {"const": SCHEMA_VERSION}
            defs[name] = {
                "type": "object",
                "description": " ".join((tp.__doc__ or "").split()),
                "properties": props,
                "required": _required(tp) + (["schema_version"] if tp is Plan else []),
                "additionalProperties": False,
            }
        if tp is Plan:
            return {"$ref": "#/$defs/Plan"}
        return {"$ref": f"#/$defs/{name}"}
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return {"enum": list(args)}
    if origin in (Union, types.UnionType):
        (inner,) = [a for a in args if a is not type(None)]
        return {"anyOf": [_schema_of(inner, defs), {"type": "null"}]}
    if origin is tuple:
        return {"type": "array", "items": _schema_of(args[0], defs)}
    if origin is dict:
        return {"type": "object", "additionalProperties": _schema_of(args[1], defs)}
    raise TypeError(f"no schema for {tp!r}")


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


def write_schema(path: str | os.PathLike[str] = SCHEMA_FILE) -> None:
    write_atomic(path, schema_text())


if __name__ == "__main__":  # python -m planner.ir.plan --write-schema
    if sys.argv[1:] == ["--write-schema"]:
        write_schema()
        print(f"wrote {SCHEMA_FILE}")
    else:
        sys.stdout.write(schema_text())
