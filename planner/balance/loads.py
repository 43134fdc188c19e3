"""Expert load matrices [layers, experts]: files, engine dumps and seeded generators.

A LOADS argument is a path (.npy, .json, .csv, .pt) or a generator spec (`uniform`,
`zipf:S`, `hot:K`) that needs the layer and expert counts. Every reader returns a
finite, non-negative float64 [L, E] matrix of tokens per expert per step, or raises
`InputError` with one line.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from costmodels.errors import InputError

# Token-expert assignments per layer of a generated step: 8192 tokens routed to the
# top-8 of DeepSeek-V3's 256 experts (DeepSeek-V3 report, arXiv 2412.19437, sec. 4.2:
# 8 routed experts per token). A scale only: the balancer works on ratios.
GENERATED_TOKENS = 8192 * 8

# hot:K makes K experts per layer this many times likelier to be picked than the rest,
# a skew of the order EPLB's README example shows (183 vs 4 tokens): an illustration.
HOT_FACTOR = 10.0

GENERATORS = ("uniform", "zipf:S", "hot:K")
SUFFIXES = (".npy", ".json", ".csv", ".pt")


def is_generator(spec: str) -> bool:
    """True when `spec` names a generator (`uniform`, `zipf:S`, `hot:K`), not a file."""
    head = spec.split(":", 1)[0]
    return head in ("uniform", "zipf", "hot") and not os.path.exists(spec)


def generate_loads(spec: str, layers: int, experts: int, seed: int = 0) -> np.ndarray:
    """Seeded token counts [layers, experts] drawn from a generator spec.

    `uniform`: every expert equally likely. `zipf:S`: the expert of rank r (a fresh random
    ranking per layer) has probability ~ r**-S. `hot:K`: K random experts per layer are
    HOT_FACTOR times likelier. Counts are a multinomial draw of GENERATED_TOKENS per layer.
    """
    if layers < 1 or experts < 1:
        raise InputError(
            f"loads {spec!r}: a generator needs --layers and --experts >= 1 (got {layers}, {experts})"
        )
    head, _, arg = spec.partition(":")
    rng = np.random.default_rng(seed)
    if head == "uniform" and not arg:
        probs = [np.full(experts, 1.0 / experts) for _ in range(layers)]
    elif head == "zipf":
        skew = _number(spec, arg, "zipf:S needs an exponent S >= 0, e.g. zipf:1.2")
        if skew < 0:
            raise InputError(f"loads {spec!r}: zipf:S needs an exponent S >= 0, e.g. zipf:1.2")
        base = np.arange(1, experts + 1, dtype=np.float64) ** -skew
        probs = [rng.permutation(base) / base.sum() for _ in range(layers)]
    elif head == "hot":
        count = _number(spec, arg, "hot:K needs an integer K, e.g. hot:8")
        if count != int(count) or not 0 <= count <= experts:
            raise InputError(f"loads {spec!r}: hot:K needs an integer 0 <= K <= {experts} experts")
        probs = []
        for _ in range(layers):
            weight = np.ones(experts)
            weight[rng.choice(experts, int(count), replace=False)] = HOT_FACTOR
            probs.append(weight / weight.sum())
    else:
        raise InputError(
            f"loads {spec!r}: unknown generator; use one of {', '.join(GENERATORS)} or a "
            f"file ending in {', '.join(SUFFIXES)}"
        )
    return np.stack([rng.multinomial(GENERATED_TOKENS, p) for p in probs]).astype(np.float64)


def _number(spec: str, text: str, rule: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"loads {spec!r}: {rule}") from None
    if not math.isfinite(value):  # float() takes 'inf' and 'nan'
        raise InputError(f"loads {spec!r}: {rule}")
    return value


def read_loads(
    spec: str,
    *,
    layers: int | None = None,
    experts: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Loads [L, E] from a file or a generator spec, checked against layers/experts if given."""
    if is_generator(spec):
        if layers is None or experts is None:
            raise InputError(
                f"loads {spec!r}: a generator needs the shape; pass --layers L --experts E"
            )
        return generate_loads(spec, layers, experts, seed)
    return check_loads(_moe_rows(load_file(spec), layers), expect_layers=layers, expect_experts=experts, source=spec)


def _moe_rows(arr: np.ndarray, layers: int | None) -> np.ndarray:
    """Drop the all-zero rows of dense layers when that leaves exactly `layers` rows.

    SGLang sizes its expert-distribution dumps by every decoder layer (DeepSeek-V3: 61 rows, the 3
    dense ones zero) while podplan counts MoE layers only (58); the non-zero rows keep their order.
    """
    if layers is None or arr.shape[0] <= layers:
        return arr
    busy = arr.any(axis=1)
    return arr[busy] if int(busy.sum()) == layers else arr


def load_file(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a loads file: .npy, .json, .csv, or a torch .pt (SGLang / vLLM dumps)."""
    where = str(path)
    p = Path(path)
    if not p.is_file():
        raise InputError(f"loads {where}: no such file; pass a .npy/.json/.csv/.pt file or a generator")
    suffix = p.suffix.lower()
    try:
        if suffix == ".npy":
            raw: Any = np.load(p, allow_pickle=False)
        elif suffix == ".json":
            raw = _from_mapping(json.loads(p.read_text()), where)
        elif suffix == ".csv":
            raw = _read_csv(p, where)
        elif suffix == ".pt":
            raw = _read_torch(p, where)
        else:
            raise InputError(f"loads {where}: unknown file type {suffix!r}; use {', '.join(SUFFIXES)}")
    except InputError:
        raise
    except (OSError, ValueError, UnicodeDecodeError, EOFError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"loads {where}: cannot read it ({reason}); check the file") from None
    return check_loads(raw, source=where)


def _read_csv(path: Path, where: str) -> list[list[float]]:
    rows = [r for r in csv.reader(path.read_text().splitlines()) if any(c.strip() for c in r)]
    if rows and not _numeric(rows[0]):
        rows = rows[1:]  # a header row of expert names
    out = []
    for i, row in enumerate(rows):
        if not _numeric(row):
            raise InputError(f"loads {where}: row {i + 1} is not all numbers; write one layer per row")
        out.append([float(c) for c in row])
    return out


def _numeric(row: list[str]) -> bool:
    try:
        [float(c) for c in row]
    except ValueError:
        return False
    return True


def _read_torch(path: Path, where: str) -> Any:
    import torch  # lazy: only .pt files need it

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad archive
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"loads {where}: cannot read the torch file ({reason[:120]})") from None
    return _from_mapping(_to_numpy(obj), where)


def _to_numpy(obj: Any) -> Any:
    if hasattr(obj, "detach"):
        return obj.detach().cpu().double().numpy()
    if isinstance(obj, dict):
        return {k: _to_numpy(v) for k, v in obj.items()}
    return obj


def _from_mapping(obj: Any, where: str) -> Any:
    """Pick the [L, E] matrix out of an engine dump; plain arrays pass through.

    SGLang's expert-distribution dump and --init-expert-location JSON hold `logical_count`
    [L, E] or [T, L, E]; vLLM's EPLB state holds `expert_load_pass` [L, P] or
    `expert_load_window` [W, L, P] over physical slots, mapped back to logical experts
    with `physical_to_logical_map` [L, P] when present.
    """
    if not isinstance(obj, dict):
        return obj
    for key in ("logical_count", "loads", "expert_load"):
        if key in obj:
            return _sum_leading(np.asarray(obj[key], dtype=np.float64), where, key)
    for key in ("expert_load_window", "expert_load_pass"):
        if key in obj:
            phys = _sum_leading(np.asarray(obj[key], dtype=np.float64), where, key)
            if "physical_to_logical_map" not in obj:
                return phys
            return _physical_to_logical(phys, np.asarray(obj["physical_to_logical_map"]), where)
    keys = ", ".join(sorted(map(str, obj))) or "none"
    raise InputError(
        f"loads {where}: no load matrix found (keys: {keys}); expected 'logical_count', "
        "'expert_load_window' or 'expert_load_pass'"
    )


def _sum_leading(arr: np.ndarray, where: str, key: str) -> np.ndarray:
    if arr.ndim == 3:
        return arr.sum(axis=0)  # a window of steps [T, L, E]: total tokens per expert
    if arr.ndim != 2:
        raise InputError(f"loads {where}: '{key}' has shape {arr.shape}; expected [L, E] or [T, L, E]")
    return arr


def _physical_to_logical(phys: np.ndarray, p2l: np.ndarray, where: str) -> np.ndarray:
    if p2l.shape != phys.shape:
        raise InputError(
            f"loads {where}: physical_to_logical_map {p2l.shape} does not match loads {phys.shape}"
        )
    if p2l.size and (p2l.min() < 0 or p2l != np.round(p2l)).any():
        raise InputError(f"loads {where}: physical_to_logical_map must hold expert ids >= 0")
    p2l = p2l.astype(np.int64)
    out = np.zeros((phys.shape[0], int(p2l.max()) + 1 if p2l.size else 0))
    for layer in range(phys.shape[0]):
        np.add.at(out[layer], p2l[layer], phys[layer])
    return out


def check_loads(
    raw: Any,
    *,
    expect_layers: int | None = None,
    expect_experts: int | None = None,
    source: str = "loads",
) -> np.ndarray:
    """Validate a load matrix: [L, E], finite, >= 0, and the expected shape when given."""
    try:
        arr = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"loads {source}: not a numeric [layers, experts] matrix (ragged rows?)") from None
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise InputError(f"loads {source}: shape {arr.shape}; expected a [layers, experts] matrix")
    if not np.isfinite(arr).all():
        where = np.argwhere(~np.isfinite(arr))[0]
        raise InputError(
            f"loads {source}: layer {where[0]} expert {where[1]} is not a finite number; "
            "loads must be finite token counts"
        )
    if (arr < 0).any():
        where = np.argwhere(arr < 0)[0]
        raise InputError(
            f"loads {source}: layer {where[0]} expert {where[1]} is negative ({arr[tuple(where)]:g}); "
            "loads must be >= 0"
        )
    layers, experts = arr.shape
    if expect_layers is not None and layers != expect_layers:
        raise InputError(
            f"loads {source}: {layers} layers but the model has {expect_layers} MoE layers (file "
            f"[{layers}, {experts}], model [{expect_layers}, {expect_experts or experts}]); pass loads measured on this model"
        )
    if expect_experts is not None and experts != expect_experts:
        raise InputError(
            f"loads {source}: {experts} experts per layer but the model has {expect_experts} (file "
            f"[{layers}, {experts}], model [{expect_layers or layers}, {expect_experts}]); pass loads measured on this model"
        )
    return arr
