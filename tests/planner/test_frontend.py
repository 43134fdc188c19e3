"""Frontend: zoo loading, structural roles, tracing at full size on meta, numerics of tiny families."""

from __future__ import annotations

import collections

import pytest
import torch

from planner.frontend.errors import ConfigError
from passes import meta
from planner.frontend import zoo
from planner.frontend.trace import TRANSFORMERS_VERSION, build_model, check_transformers, trace, trace_model
from planner.frontend.roles import recognise
from planner.frontend.shape import shape_from_traced, shape_of

TINY = ["tiny-deepseek-v3", "tiny-qwen3-moe", "tiny-mixtral", "tiny-olmoe"]


def _roles(traced) -> collections.Counter:
    return collections.Counter(meta.role_of(n) for n in traced.gm.graph.nodes if n.op == "call_module")


@pytest.mark.parametrize("name", TINY)
def test_tiny_traced_module_reproduces_transformers(name):
    traced = trace(name, device="cpu", seed=3)
    ids = torch.randint(0, traced.model.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = traced.model(input_ids=ids, use_cache=False).logits
        out = traced.gm(ids)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= 1e-6
    # a different seed gives different weights: the comparison above is not vacuous
    other = trace(name, device="cpu", seed=4)
    with torch.no_grad():
        assert (other.gm(ids) - out).abs().max().item() > 1e-4


def test_deepseek_v3_full_size_on_meta():
    traced = trace("deepseek-v3")
    assert all(p.device.type == "meta" for p in traced.gm.parameters())
    shape = shape_from_traced(traced)
    assert shape.num_layers == 61 and shape.num_moe_layers == 58
    assert shape.moe_layers == tuple(range(3, 61))
    assert (shape.num_routed_experts, shape.num_shared_experts, shape.top_k) == (256, 1, 8)
    assert 665e9 < shape.params_total < 675e9
    assert 36e9 < shape.params_active < 39e9
    assert shape.attention == "mla" and shape.kv_values_per_token_per_layer() == 512 + 64
    roles = _roles(traced)
    assert roles["attention"] == 61 and roles["dense_ffn"] == 3
    assert roles["moe_gate"] == roles["routed_experts"] == roles["shared_experts"] == 58
    assert roles["embed"] == 1 and roles["lm_head"] == 1
    # every node has a role and a layer key, and layer indices stay in range
    for node in traced.gm.graph.nodes:
        assert meta.role_of(node) in {"embed", "attention", "norm", "dense_ffn", "moe_gate", "routed_experts",
                                      "shared_experts", "lm_head", "other"}
        layer = meta.layer_of(node)
        assert layer is None or 0 <= layer < 61


def test_qwen3_235b_full_size_on_meta():
    traced = trace("qwen3-235b-a22b")
    shape = shape_from_traced(traced)
    assert (shape.num_layers, shape.num_moe_layers, shape.num_routed_experts, shape.top_k) == (94, 94, 128, 8)
    assert shape.num_shared_experts == 0 and shape.attention == "gqa" and shape.num_kv_heads == 4
    assert 233e9 < shape.params_total < 237e9 and 21e9 < shape.params_active < 23e9
    roles = _roles(traced)
    assert roles["attention"] == 94 and roles["routed_experts"] == 94 and roles["dense_ffn"] == 0


@pytest.mark.parametrize(
    "name,total,active",
    [("mixtral-8x7b", 46.7e9, 12.9e9), ("mixtral-8x22b", 140.6e9, 39.2e9), ("olmoe-1b-7b", 6.9e9, 1.3e9),
     ("qwen3-30b-a3b", 30.5e9, 3.3e9)],
)
def test_published_parameter_counts(name, total, active):
    shape = shape_of(name)
    assert abs(shape.params_total - total) / total < 0.01
    assert abs(shape.params_active - active) / active < 0.03


def test_unnamed_family_traces_without_new_code():
    """Qwen2-MoE is not in the zoo; its structure (router, 3-D experts, gated shared expert) is standard."""
    cfg = dict(model_type="qwen2_moe", hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
               shared_expert_intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=256, num_experts=8, num_experts_per_tok=2, torch_dtype="float32")
    src = zoo.ModelSource("qwen2-moe-test", "test", cfg)
    model = build_model(src, device="cpu", seed=1)
    traced = trace_model(model, src)
    roles = _roles(traced)
    assert roles["routed_experts"] == 2 and roles["shared_experts"] == 4  # shared MLP + its sigmoid gate
    ids = torch.randint(0, 256, (2, 6))
    with torch.no_grad():
        assert (traced.gm(ids) - model(input_ids=ids, use_cache=False).logits).abs().max().item() <= 1e-6


def test_gpt_oss_120b_full_size_on_meta():
    traced = trace("gpt-oss-120b")
    shape = shape_from_traced(traced)
    assert (shape.num_layers, shape.num_moe_layers, shape.num_routed_experts, shape.top_k) == (36, 36, 128, 4)
    # OpenAI's model card: 116.83B total, 5.13B active; our active count also includes the 0.58B
    # embedding table (a lookup), as it does for every model
    assert abs(shape.params_total - 116.83e9) / 116.83e9 < 0.005
    assert abs(shape.params_active - (5.13e9 + 201088 * 2880)) / 5.7e9 < 0.01
    masks = [n for n in traced.gm.graph.nodes if getattr(n.target, "__name__", "") == "podplan_causal_mask"]
    assert sorted(n.args[2] for n in masks) == [0, 128]  # full and 128-token sliding layers
    # the cost models' view of the windows (from the config) is what the traced attention uses
    windows = [n.kwargs["attention_mask"].args[2] for n in traced.gm.graph.nodes
               if n.op == "call_module" and meta.role_of(n) == "attention"]
    assert (shape.sliding_window, shape.sliding_layers) == (128, sum(1 for w in windows if w == 128)) == (128, 18)


def test_kimi_k2_runs_as_deepseek_v3_at_full_size():
    """Kimi K2's config says model_type "kimi_k2" (unknown to transformers); it is DeepSeek-V3's code."""
    src = zoo.load_source("kimi-k2")
    assert src.config["model_type"] == "kimi_k2"  # the file as published; the plan keeps it unchanged
    traced = trace("kimi-k2")
    assert type(traced.model).__name__ == "DeepseekV3ForCausalLM"
    shape = shape_from_traced(traced)
    assert (shape.num_layers, shape.num_moe_layers, shape.num_routed_experts, shape.top_k) == (61, 60, 384, 8)
    assert shape.attention == "mla" and shape.num_heads == 64
    # Moonshot's model card: 1T total, 32B activated
    assert 1.00e12 < shape.params_total < 1.06e12 and 31e9 < shape.params_active < 34e9


def _tiny_deepseek(**changes) -> dict:
    cfg = dict(zoo.load_source("tiny-deepseek-v3").config)
    cfg.update(changes)
    return cfg


@pytest.mark.parametrize("how", ["alias", "architectures", "text_config"])
def test_renamed_and_nested_configs_build_the_family_they_name(how):
    if how == "alias":  # a known rename
        cfg = _tiny_deepseek(model_type="kimi_k2", n_group=1, topk_group=1)
    elif how == "architectures":  # an unknown model_type whose architecture transformers implements
        cfg = _tiny_deepseek(model_type="someones_fork_of_dsv3")
    else:  # a vision-language checkpoint: podplan plans its decoder (text_config), dtype from the outside
        inner = _tiny_deepseek(model_type="kimi_k2")
        del inner["torch_dtype"], inner["architectures"]
        cfg = {"model_type": "kimi_k25", "architectures": ["KimiK25ForConditionalGeneration"],
               "torch_dtype": "float32", "text_config": inner, "vision_config": {"hidden_size": 8}}
    src = zoo.ModelSource(f"renamed-{how}", "test", cfg)
    model = build_model(src, device="cpu", seed=2)
    assert type(model).__name__ == "DeepseekV3ForCausalLM" and next(model.parameters()).dtype == torch.float32
    traced = trace_model(model, src)
    assert _roles(traced)["routed_experts"] == 2
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (traced.gm(ids) - model(input_ids=ids, use_cache=False).logits).abs().max().item() <= 1e-6
    # the plan's identity is the file as given, not the resolved config
    assert src.digest() != zoo.load_source("tiny-deepseek-v3").digest()


def test_unrecognised_structure_names_module_and_class():
    src = zoo.load_source("tiny-mixtral")
    model = build_model(src, device="meta")

    class Mystery(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blob = torch.nn.Parameter(torch.zeros(4, 4, 4, 4))

    model.model.layers[1].mlp = Mystery()
    from planner.frontend.trace import CausalLMRoot

    with pytest.raises(ConfigError, match=r"lm\.model\.layers\.1\.mlp \(Mystery\)"):
        recognise(CausalLMRoot(model))


def test_transformers_version_is_pinned(monkeypatch):
    import transformers

    check_transformers()
    monkeypatch.setattr(transformers, "__version__", "5.99.0")
    with pytest.raises(ConfigError, match=f"pinned to {TRANSFORMERS_VERSION}"):
        check_transformers()


def test_source_digest_is_stable_and_sensitive():
    a = zoo.load_source("deepseek-v3")
    b = zoo.load_source("deepseek-v3")
    assert a.digest() == b.digest()
    c = zoo.ModelSource(a.name, a.origin, dict(a.config, num_hidden_layers=60))
    assert c.digest() != a.digest()


def test_config_path_and_directory(tmp_path):
    text = zoo.resources.files("planner.frontend").joinpath("configs", "tiny-olmoe.json").read_text()
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(text)
    by_dir = zoo.load_source(str(tmp_path / "m"))
    by_file = zoo.load_source(str(tmp_path / "m" / "config.json"))
    assert by_dir.config == by_file.config and by_dir.name == "m"
