"""The model zoo: bundled config.json files by name, or a user's config.json / model directory.

Bundled configs are the public `config.json` values of the model cards (quantization and
remote-code keys dropped: podplan builds transformers' own classes, never the checkpoint).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from planner.frontend.errors import ConfigError

# name -> (Hugging Face repo the config.json comes from, one-line description)
BUNDLED: dict[str, tuple[str, str]] = {
    "deepseek-v3": ("deepseek-ai/DeepSeek-V3", "DeepSeek-V3 / R1, 671B MoE with MLA (also valid for R1)"),
    "kimi-k2": ("moonshotai/Kimi-K2-Instruct", "Kimi K2, 1T MoE: DeepSeek-V3's architecture with 384 experts, 64 heads"),
    "qwen3-235b-a22b": ("Qwen/Qwen3-235B-A22B", "Qwen3 235B MoE, 128 experts top-8, GQA"),
    "qwen3-30b-a3b": ("Qwen/Qwen3-30B-A3B", "Qwen3 30B MoE, 128 experts top-8, GQA"),
    "gpt-oss-120b": ("openai/gpt-oss-120b", "gpt-oss 120B, 128 experts top-4, alternating 128-token sliding window"),
    "mixtral-8x7b": ("mistralai/Mixtral-8x7B-v0.1", "Mixtral 8x7B, 8 experts top-2, GQA"),
    "mixtral-8x22b": ("mistralai/Mixtral-8x22B-v0.1", "Mixtral 8x22B, 8 experts top-2, GQA"),
    "olmoe-1b-7b": ("allenai/OLMoE-1B-7B-0924", "OLMoE 1B-active / 7B, 64 experts top-8"),
    "tiny-deepseek-v3": ("(podplan)", "3-layer DeepSeek-V3 family (MLA, shared expert, 1 dense layer) for numerics"),
    "tiny-qwen3-moe": ("(podplan)", "2-layer Qwen3-MoE family for numerics"),
    "tiny-mixtral": ("(podplan)", "2-layer Mixtral family for numerics"),
    "tiny-olmoe": ("(podplan)", "2-layer OLMoE family for numerics"),
}


@dataclass(frozen=True)
class ModelSource:
    """A model as the user named it: its display name, where it came from, its config dict."""

    name: str
    origin: str  # "bundled" or the path of the config.json
    config: dict

    def digest(self) -> str:
        """sha256 of the canonical config JSON: the plan's model identity."""
        canon = json.dumps(self.config, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()


def bundled_names() -> list[str]:
    return list(BUNDLED)


def _read_json(path: Path, shown: str) -> dict:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{shown}: cannot read config ({exc.strerror}); give a readable config.json") from None
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark is still UTF-8
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{shown}: not UTF-8 text (byte {exc.start} is 0x{raw[exc.start]:02x}; a binary file?); "
                          "give the model's config.json") from None
    if "\x00" in text:
        raise ConfigError(f"{shown}: holds NUL bytes (a binary file?); give the model's config.json")
    try:
        # Infinity stays accepted: Mamba-hybrid configs carry time_step_limit [0.0, Infinity]
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{shown}: malformed JSON at line {exc.lineno} column {exc.colno} ({exc.msg}); fix the config.json"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{shown}: config.json must hold a JSON object, got {type(data).__name__}")
    return data


def load_source(model: str) -> ModelSource:
    """Resolve a bundled name, a path to a config.json, or a directory holding one."""
    if model in BUNDLED:
        text = resources.files("planner.frontend").joinpath("configs", f"{model}.json").read_text()
        return ModelSource(name=model, origin="bundled", config=json.loads(text))
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{model}: directory has no config.json; point at a model directory or a config file")
    if path.is_file():
        config = _read_json(path, model)
        name = path.parent.name if path.name == "config.json" else path.stem
        return ModelSource(name=name or "model", origin=str(path), config=config)
    known = ", ".join(BUNDLED)
    raise ConfigError(f"unknown model '{model}': not a bundled name nor a config.json path; bundled: {known}")
