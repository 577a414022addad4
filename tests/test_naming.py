"""Tests for lit_safety.models.naming against tiny random transformers-5 models."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch

import transformers
from lit_safety.models.naming import (
    COMPONENTS,
    ParamLocation,
    expert_slices,
    is_excluded_by_default,
    num_experts,
    parse_param_name,
)

_COMMON: dict[str, Any] = dict(
    vocab_size=100,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
_N_EXPERTS = 4

# family -> (config class name, config kwargs, components that must appear)
FAMILIES: dict[str, tuple[str, dict[str, Any], set[str]]] = {
    "llama": ("LlamaConfig", {}, {"q", "k", "v", "o", "gate", "up", "down", "lm_head"}),
    "qwen2": ("Qwen2Config", {}, {"q", "v", "gate", "down"}),
    "mistral": ("MistralConfig", {}, {"q", "k", "v", "o", "gate", "up", "down"}),
    "gemma2": ("Gemma2Config", {"head_dim": 8}, {"q", "v", "gate", "up", "down", "mlp_norm"}),
    "mixtral": (
        "MixtralConfig",
        {"num_local_experts": _N_EXPERTS, "num_experts_per_tok": 2},
        {"q", "v", "router", "expert_gate_up", "expert_down"},
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        {
            "num_experts": _N_EXPERTS,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 16,
            "shared_expert_intermediate_size": 32,
        },
        {"router", "expert_gate_up", "expert_down", "shared_gate", "shared_up", "shared_down"}
        | {"shared_expert_gate"},
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        {
            "num_experts": _N_EXPERTS,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 16,
            "head_dim": 8,
        },
        {"router", "expert_gate_up", "expert_down", "attn_norm"},
    ),
    "olmoe": (
        "OlmoeConfig",
        {"num_experts": _N_EXPERTS, "num_experts_per_tok": 2},
        {"router", "expert_gate_up", "expert_down", "attn_norm"},
    ),
    # Llama4 stacks experts transposed: gate_up_proj [E, H, 2I], down_proj [E, I, H].
    "llama4": (
        "Llama4TextConfig",
        {
            "num_local_experts": _N_EXPERTS,
            "num_experts_per_tok": 1,
            "intermediate_size_mlp": 64,
            "head_dim": 8,
        },
        {"router", "expert_gate_up", "expert_down", "shared_gate", "shared_up", "shared_down"},
    ),
    "phi3": ("Phi3Config", {"pad_token_id": 0}, {"qkv", "o", "gate_up", "down"}),
    "gpt2": (
        "GPT2Config",
        {},
        {"qkv", "o", "up", "down", "embed", "final_norm", "attn_norm", "mlp_norm"},
    ),
}

_GPT2_KWARGS: dict[str, Any] = dict(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64)

_ALWAYS_EXCLUDED = {
    "attn_norm",
    "mlp_norm",
    "norm",
    "final_norm",
    "embed",
    "router",
    "shared_expert_gate",
}


def _build(family: str) -> torch.nn.Module:
    cls_name, extra, _ = FAMILIES[family]
    cls: Callable[..., Any] | None = getattr(transformers, cls_name, None)
    if cls is None:
        pytest.skip(f"{cls_name} not available in transformers {transformers.__version__}")
    kwargs = _GPT2_KWARGS if family == "gpt2" else {**_COMMON, **extra}
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cls(**kwargs))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_model(request: pytest.FixtureRequest) -> tuple[str, torch.nn.Module]:
    return request.param, _build(request.param)


def _layer_in_name(name: str) -> int | None:
    m = re.search(r"\.(?:layers|h)\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def test_every_param_parses_sensibly(family_model: tuple[str, torch.nn.Module]) -> None:
    family, model = family_model
    seen: set[str] = set()
    for name, param in model.named_parameters():
        loc = parse_param_name(name)
        seen.add(loc.component)
        assert loc.name == name
        assert loc.component in COMPONENTS
        assert loc.component != "other", name
        assert loc.layer == _layer_in_name(name), name
        assert loc.kind == ("bias" if name.endswith("bias") else "weight"), name

        if ".v_proj." in name:
            assert loc.component == "v"
        if "embed_tokens" in name:
            assert loc.component == "embed"
        if name.startswith("lm_head"):
            assert loc.component == "lm_head"

        # MoE: 3D expert stacks are flagged and carry their expert count.
        if param.dim() == 3:
            assert loc.is_expert_stack, name
            assert loc.component.startswith("expert_"), name
            assert loc.expert is None
            assert num_experts(name, param.shape) == _N_EXPERTS
            slices = expert_slices(param, loc)
            assert [e for e, _ in slices] == list(range(_N_EXPERTS))
            assert all(v.shape == param.shape[1:] for _, v in slices)
            assert slices[1][1].data_ptr() == param[1].data_ptr()  # views, not copies
        else:
            assert not loc.is_expert_stack, name
            assert num_experts(name, param.shape) is None
            assert expert_slices(param, loc) == [(None, param)]

        # Default exclusions.
        excluded = is_excluded_by_default(loc)
        if loc.component in _ALWAYS_EXCLUDED or loc.kind == "bias":
            assert excluded, name
        else:
            assert not excluded, name
        if loc.component == "router":
            assert param.dim() == 2 and param.shape[0] == _N_EXPERTS, name

    assert FAMILIES[family][2] <= seen, f"{family}: missing {FAMILIES[family][2] - seen}"


def test_router_vs_dense_gate() -> None:
    assert parse_param_name("model.layers.0.mlp.gate.weight").component == "router"
    assert parse_param_name("model.layers.0.mlp.gate_proj.weight").component == "gate"
    assert parse_param_name("model.layers.0.block_sparse_moe.gate.weight").component == "router"
    assert parse_param_name("model.layers.0.mlp.router.weight").component == "router"
    assert parse_param_name("model.layers.0.mlp.router.bias").component == "router"
    loc = parse_param_name("model.layers.0.mlp.gate.e_score_correction_bias")  # DeepSeek-V3
    assert (loc.component, loc.kind) == ("router", "bias")
    old_granite = "model.layers.0.block_sparse_moe.router.layer.weight"
    assert parse_param_name(old_granite).component == "router"
    loc = parse_param_name("model.layers.2.mlp.shared_expert_gate.weight")
    assert (loc.layer, loc.component) == (2, "shared_expert_gate")
    assert is_excluded_by_default(loc)


@pytest.mark.parametrize(
    "prefix",
    [
        "",
        "model.",
        "_orig_mod.",
        "module.",
        "_fsdp_wrapped_module.",
        "_checkpoint_wrapped_module.",
        "module._orig_mod.model.",
        "_fsdp_wrapped_module._checkpoint_wrapped_module.",
    ],
)
def test_prefix_stripping(prefix: str) -> None:
    loc = parse_param_name(f"{prefix}model.layers.7.self_attn.v_proj.weight")
    assert (loc.layer, loc.component, loc.kind) == (7, "v", "weight")
    assert parse_param_name(f"{prefix}model.embed_tokens.weight").component == "embed"
    assert parse_param_name(f"{prefix}model.norm.weight").component == "final_norm"
    assert parse_param_name(f"{prefix}lm_head.weight") == ParamLocation(
        name=f"{prefix}lm_head.weight", layer=None, component="lm_head"
    )


def test_fsdp_wrappers_inside_layers() -> None:
    name = "model.layers.3._fsdp_wrapped_module._checkpoint_wrapped_module.mlp.down_proj.weight"
    loc = parse_param_name(name)
    assert (loc.name, loc.layer, loc.component) == (name, 3, "down")


def test_lightning_module_prefix() -> None:
    loc = parse_param_name("model.model.layers.11.mlp.experts.gate_up_proj")
    assert (loc.layer, loc.component, loc.expert) == (11, "expert_gate_up", None)
    assert loc.is_expert_stack
    assert num_experts("model.model.layers.11.mlp.experts.gate_up_proj", (8, 64, 32)) == 8


@pytest.mark.parametrize(
    ("name", "expert", "component"),
    [
        ("model.layers.3.block_sparse_moe.experts.2.w1.weight", 2, "expert_gate"),
        ("model.layers.3.block_sparse_moe.experts.2.w3.weight", 2, "expert_up"),
        ("model.layers.3.block_sparse_moe.experts.5.w2.weight", 5, "expert_down"),
        ("model.layers.3.mlp.experts.0.gate_proj.weight", 0, "expert_gate"),
        ("model.layers.3.mlp.experts.11.up_proj.weight", 11, "expert_up"),
        ("model.layers.3.mlp.experts.1.down_proj.weight", 1, "expert_down"),
    ],
)
def test_per_expert_2d_layout(name: str, expert: int, component: str) -> None:
    loc = parse_param_name(name)
    assert (loc.layer, loc.expert, loc.component) == (3, expert, component)
    assert not loc.is_expert_stack
    assert num_experts(name, (64, 32)) is None
    w = torch.zeros(64, 32)
    assert expert_slices(w, loc) == [(None, w)]
    assert not is_excluded_by_default(loc)


def test_split_expert_stacks_and_stacked_biases() -> None:
    # Split 3D stacks (gate/up separate) and gpt-oss style stacked biases [E, out].
    assert parse_param_name("model.layers.0.mlp.experts.gate_proj").component == "expert_gate"
    assert parse_param_name("model.layers.0.mlp.experts.up_proj").component == "expert_up"
    loc = parse_param_name("model.layers.0.mlp.experts.gate_up_proj_bias")
    assert (loc.component, loc.kind, loc.is_expert_stack) == ("expert_gate_up", "bias", True)
    assert num_experts(loc.name, (4, 128)) == 4
    assert is_excluded_by_default(loc)


@pytest.mark.parametrize(
    ("name", "layer", "component"),
    [
        ("transformer.h.0.attn.c_attn.weight", 0, "qkv"),
        ("transformer.h.0.attn.c_proj.weight", 0, "o"),
        ("transformer.h.1.mlp.c_fc.weight", 1, "up"),
        ("transformer.h.1.mlp.c_proj.weight", 1, "down"),
        ("transformer.h.0.ln_1.weight", 0, "attn_norm"),
        ("transformer.h.0.ln_2.bias", 0, "mlp_norm"),
        ("transformer.wte.weight", None, "embed"),
        ("transformer.wpe.weight", None, "embed"),
        ("transformer.ln_f.weight", None, "final_norm"),
        ("model.layers.0.self_attn.qkv_proj.weight", 0, "qkv"),
        ("model.layers.0.mlp.gate_up_proj.weight", 0, "gate_up"),
        ("model.layers.4.self_attn.q_norm.weight", 4, "attn_norm"),
        ("model.layers.4.self_attn.k_norm.weight", 4, "attn_norm"),
        ("model.layers.4.pre_feedforward_layernorm.weight", 4, "mlp_norm"),
        ("model.layers.4.post_feedforward_layernorm.weight", 4, "mlp_norm"),
        ("model.layers.4.mlp.shared_expert.gate_proj.weight", 4, "shared_gate"),
        ("model.layers.4.mlp.shared_experts.down_proj.weight", 4, "shared_down"),
        ("gpt_neox.layers.2.attention.query_key_value.weight", 2, "qkv"),
        ("gpt_neox.layers.2.attention.dense.weight", 2, "o"),
        ("gpt_neox.layers.2.mlp.dense_4h_to_h.weight", 2, "down"),
        ("gpt_neox.embed_in.weight", None, "embed"),
        ("embed_out.weight", None, "lm_head"),
        ("model.decoder.layers.0.fc1.weight", 0, "up"),
        ("model.decoder.layers.0.final_layer_norm.weight", 0, "mlp_norm"),
        ("model.decoder.final_layer_norm.weight", None, "final_norm"),
    ],
)
def test_explicit_names(name: str, layer: int | None, component: str) -> None:
    loc = parse_param_name(name)
    assert (loc.layer, loc.component) == (layer, component)


def test_biases_excluded_lm_head_not() -> None:
    assert is_excluded_by_default(parse_param_name("model.layers.0.self_attn.q_proj.bias"))
    assert not is_excluded_by_default(parse_param_name("model.layers.0.self_attn.q_proj.weight"))
    assert not is_excluded_by_default(parse_param_name("lm_head.weight"))
    assert is_excluded_by_default(parse_param_name("lm_head.bias"))


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        "weight",
        "foo",
        "a..b",
        "model.layers.x.mlp.gate_proj.weight",
        "model.layers.0",
        "model.layers.0.mystery.weight",
    ],
)
def test_unknown_names_never_raise(name: str) -> None:
    loc = parse_param_name(name)
    assert loc.component == "other"
    assert num_experts(name, (3, 4, 5)) is None
