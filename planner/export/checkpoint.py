"""What an engine will load for the plan's model: its architecture and the checkpoint's own quantisation.

Engine flags depend on these facts, not on the model's name: SGLang takes the DeepEP all-to-all
path, and holds redundant expert slots, only in the model classes written for them; an engine reads
a pre-quantised checkpoint's method from its config.json (another `--quantization` is refused).
"""

from __future__ import annotations

from planner.frontend.zoo import BUNDLED, load_source
from planner.ir import plan as ir

# `quantization_config.quant_method` in the config.json of the bundled models' checkpoints (their Hugging
# Face repos); a repo not listed ships bf16 weights. The bundled configs drop the key (podplan builds the
# architecture, not the checkpoint), so the fact is kept here, by repository.
CHECKPOINT_QUANT: dict[str, str] = {
    "deepseek-ai/DeepSeek-V3": "fp8",
    "moonshotai/Kimi-K2-Instruct": "fp8",
    "openai/gpt-oss-120b": "mxfp4",
}

# Model classes of SGLang 0.5.23 (sglang/srt/models/) by what their MoE block does:
# - dispatches tokens through the all-to-all backend (DeepEP): deepseek_v2.py (DeepSeek-V2/V3, Kimi K2
#   is DeepseekV3ForCausalLM), qwen2_moe.py, qwen3_moe.py. gpt_oss.py raises NotImplementedError on its
#   DeepEP branch; mixtral.py and olmoe.py build a plain FusedMoE.
# - sizes its experts num_experts + ep_num_redundant_experts, so redundant slots and an
#   --init-expert-location map apply: the same three files plus gpt_oss.py; mixtral.py and olmoe.py do not.
SGLANG_A2A_ARCHITECTURES = frozenset({"DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "Qwen2MoeForCausalLM",
                                      "Qwen3MoeForCausalLM"})
SGLANG_EXPERT_LOCATION_ARCHITECTURES = SGLANG_A2A_ARCHITECTURES | {"GptOssForCausalLM"}

def architecture(model: ir.ModelInfo) -> str | None:
    """The config's `architectures[0]` for a bundled model whose config the plan was compiled from, else None."""
    if model.name not in BUNDLED:
        return None
    src = load_source(model.name)
    if src.digest() != model.config_sha256:
        return None  # a user config that reuses a bundled name: its class is not known here
    archs = src.config.get("architectures") or [None]
    return archs[0] if isinstance(archs[0], str) else None


def checkpoint_quant(hf_repo: str) -> str | None:
    """The quantisation method the checkpoint at `hf_repo` ships with; None for bf16 weights."""
    return CHECKPOINT_QUANT.get(hf_repo)
