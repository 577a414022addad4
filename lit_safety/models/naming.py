"""Map parameter names of transformers-5 causal LMs to (layer, component, expert).

Parsing is by name only and never raises: unknown names get component ``"other"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "COMPONENTS",
    "ParamLocation",
    "parse_param_name",
    "num_experts",
    "is_excluded_by_default",
    "expert_slices",
]

COMPONENTS: tuple[str, ...] = (
    "embed",
    "q",
    "k",
    "v",
    "o",
    "qkv",
    "attn_norm",
    "gate",
    "up",
    "gate_up",
    "down",
    "mlp_norm",
    "router",
    "shared_gate",
    "shared_up",
    "shared_down",
    "shared_expert_gate",
    "expert_gate_up",
    "expert_gate",
    "expert_up",
    "expert_down",
    "norm",
    "final_norm",
    "lm_head",
    "other",
)


@dataclass(frozen=True)
class ParamLocation:
    """Where a parameter lives in a decoder-only transformer."""

    name: str
    layer: int | None  # decoder layer index; None for embeddings / final norm / lm_head
    component: str  # one of COMPONENTS
    # Expert index for per-expert 2D params (``...experts.3.w1.weight``); None for
    # stacked expert tensors (the expert is dim 0) and for non-expert params.
    expert: int | None = None
    # True for stacked expert tensors ``[E, ...]`` (transformers-5 layout), including
    # stacked expert biases such as gpt-oss ``experts.gate_up_proj_bias`` ``[E, 2I]``.
    is_expert_stack: bool = False
    kind: str = "weight"  # "weight" | "bias"


# Wrapper modules (torch.compile, FSDP, activation checkpointing) that may appear anywhere.
_WRAPPER_TOKENS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
# Wrappers that only appear as a leading prefix (DDP, PEFT).
_LEADING_WRAPPER_TOKENS = frozenset({"module", "base_model"})

# ModuleList names that hold decoder layers: ``model.layers.3``, ``transformer.h.3``, ...
_LAYER_CONTAINERS = frozenset({"layers", "h", "blocks", "layer", "block"})

_EMBED_LEAVES = frozenset(
    {"embed_tokens", "wte", "wpe", "embed_in", "embed_positions", "word_embeddings", "tok_embeddings"}
)
_LM_HEAD_LEAVES = frozenset({"lm_head", "embed_out"})
_FINAL_NORM_LEAVES = frozenset({"norm", "ln_f", "final_layernorm", "final_layer_norm", "norm_f"})

# Norm leaves inside a layer. ``post_attention_layernorm`` follows the Llama convention
# (it is the pre-MLP norm); in Gemma2/3 and OLMo2 it normalises the attention output.
_ATTN_NORM_LEAVES = frozenset(
    {"input_layernorm", "ln_1", "self_attn_layer_norm", "attention_norm", "q_norm", "k_norm", "q_layernorm",
     "k_layernorm", "q_a_layernorm", "kv_a_layernorm"}
)
_MLP_NORM_LEAVES = frozenset(
    {"post_attention_layernorm", "ln_2", "pre_feedforward_layernorm", "post_feedforward_layernorm",
     "final_layer_norm",  # inside a layer (OPT): the pre-MLP norm
     "ffn_norm"}
)

_ATTN_CONTAINERS = frozenset({"self_attn", "attn", "attention", "self_attention"})
_MLP_CONTAINERS = frozenset({"mlp", "block_sparse_moe", "feed_forward", "moe", "ffn"})
_SHARED_CONTAINERS = frozenset({"shared_expert", "shared_experts", "shared_mlp"})

_ATTN_LEAVES: dict[str, str] = {
    "q_proj": "q",
    "q_a_proj": "q",  # DeepSeek MLA low-rank query projections
    "q_b_proj": "q",
    "query": "q",
    "k_proj": "k",
    "key": "k",
    "v_proj": "v",
    "value": "v",
    "o_proj": "o",
    "out_proj": "o",
    "dense": "o",  # GPT-NeoX / Phi attention output
    "c_proj": "o",  # GPT-2 attention output
    "qkv_proj": "qkv",
    "c_attn": "qkv",
    "query_key_value": "qkv",
    "Wqkv": "qkv",
    "qkv": "qkv",
}
_MLP_LEAVES: dict[str, str] = {
    "gate_proj": "gate",
    "w1": "gate",
    "up_proj": "up",
    "w3": "up",
    "c_fc": "up",
    "fc1": "up",
    "dense_h_to_4h": "up",
    "down_proj": "down",
    "w2": "down",
    "c_proj": "down",  # GPT-2 MLP output
    "fc2": "down",
    "dense_4h_to_h": "down",
    "gate_up_proj": "gate_up",
}
_SHARED_LEAVES: dict[str, str] = {
    "gate_proj": "shared_gate",
    "up_proj": "shared_up",
    "down_proj": "shared_down",
    "output_linear": "shared_down",
}
_EXPERT_LEAVES: dict[str, str] = {
    "gate_up_proj": "expert_gate_up",
    "input_linear": "expert_gate_up",  # Granite-MoE
    "w13": "expert_gate_up",
    "gate_proj": "expert_gate",
    "w1": "expert_gate",
    "up_proj": "expert_up",
    "w3": "expert_up",
    "down_proj": "expert_down",
    "w2": "expert_down",
    "output_linear": "expert_down",
}

_ROUTER_PARAMS = frozenset({"e_score_correction"})  # ``e_score_correction_bias`` minus suffix

_EXCLUDED_COMPONENTS = frozenset(
    {"embed", "attn_norm", "mlp_norm", "norm", "final_norm", "router", "shared_expert_gate"}
)


def _strip_wrappers(name: str) -> list[str]:
    tokens = [t for t in name.split(".") if t and t not in _WRAPPER_TOKENS]
    while tokens and tokens[0] in _LEADING_WRAPPER_TOKENS:
        tokens = tokens[1:]
    return tokens


def _split_kind(tokens: Sequence[str]) -> tuple[list[str], str]:
    """Split ``[..., module, weight|bias]`` or ``[..., raw_param]`` into (module path, kind).

    Raw parameters (3D expert stacks like ``experts.gate_up_proj``) are treated as their
    own leaf; a ``_bias`` suffix (gpt-oss ``gate_up_proj_bias``) marks a bias.
    """
    if not tokens:
        return [], "weight"
    last = tokens[-1]
    if last in ("weight", "bias"):
        return list(tokens[:-1]), last
    if last.endswith("_bias"):
        return [*tokens[:-1], last[: -len("_bias")]], "bias"
    return list(tokens), "weight"


def _is_norm_leaf(leaf: str) -> bool:
    return "norm" in leaf or leaf.startswith("ln_") or leaf == "ln"


def _classify_in_layer(path: list[str]) -> tuple[str, int | None, bool]:
    """Classify a module path relative to a decoder layer -> (component, expert, is_stack)."""
    if not path:
        return "other", None, False
    leaf = path[-1]

    if "experts" in path:
        i = path.index("experts")
        rest = path[i + 1 :]
        expert: int | None = None
        if rest and rest[0].isdigit():
            expert, rest = int(rest[0]), rest[1:]
        component = next(
            (_EXPERT_LEAVES[t] for t in reversed(rest) if t in _EXPERT_LEAVES), "other"
        )
        return component, expert, expert is None

    if leaf == "shared_expert_gate":
        return "shared_expert_gate", None, False
    if any(t in _SHARED_CONTAINERS for t in path):
        return _SHARED_LEAVES.get(leaf, "other"), None, False

    # MoE routers: ``mlp.gate`` (Mixtral/Qwen-MoE/OLMoE/DeepSeek), ``router`` (gpt-oss,
    # Llama4, Granite-MoE, PhiMoE), ``router.layer`` (older Granite), score-correction bias.
    if "router" in path or leaf in _ROUTER_PARAMS:
        return "router", None, False
    if leaf == "gate" and len(path) >= 2 and path[-2] in _MLP_CONTAINERS:
        return "router", None, False

    if leaf in _ATTN_NORM_LEAVES:
        return "attn_norm", None, False
    if leaf in _MLP_NORM_LEAVES:
        return "mlp_norm", None, False
    if _is_norm_leaf(leaf):
        return "norm", None, False

    parent = path[-2] if len(path) >= 2 else ""
    in_attn = parent in _ATTN_CONTAINERS
    in_mlp = parent in _MLP_CONTAINERS or parent == ""
    if in_attn and leaf in _ATTN_LEAVES:
        return _ATTN_LEAVES[leaf], None, False
    if in_mlp and leaf in _MLP_LEAVES:
        return _MLP_LEAVES[leaf], None, False
    # Unusual nesting: fall back to unambiguous leaf names.
    if leaf in _ATTN_LEAVES and leaf not in ("dense", "c_proj", "query", "key", "value", "qkv"):
        return _ATTN_LEAVES[leaf], None, False
    if leaf in _MLP_LEAVES and leaf not in ("c_proj", "w1", "w2", "w3"):
        return _MLP_LEAVES[leaf], None, False
    return "other", None, False


def _classify_top_level(path: list[str]) -> str:
    leaf = path[-1] if path else ""
    if leaf in _EMBED_LEAVES:
        return "embed"
    if leaf in _LM_HEAD_LEAVES:
        return "lm_head"
    if leaf in _FINAL_NORM_LEAVES or _is_norm_leaf(leaf):
        return "final_norm"
    return "other"


def parse_param_name(name: str) -> ParamLocation:
    """Parse a (possibly wrapped) parameter name into a :class:`ParamLocation`."""
    tokens = _strip_wrappers(name)
    path, kind = _split_kind(tokens)

    for i in range(len(path) - 1):
        if path[i] in _LAYER_CONTAINERS and path[i + 1].isdigit():
            component, expert, is_stack = _classify_in_layer(path[i + 2 :])
            return ParamLocation(
                name=name,
                layer=int(path[i + 1]),
                component=component,
                expert=expert,
                is_expert_stack=is_stack,
                kind=kind,
            )
    return ParamLocation(name=name, layer=None, component=_classify_top_level(path), kind=kind)


def _stack_size(loc: ParamLocation, shape: Sequence[int]) -> int | None:
    if not loc.is_expert_stack:
        return None
    if len(shape) == 3 or (len(shape) == 2 and loc.kind == "bias"):
        return int(shape[0])
    return None


def num_experts(param_name: str, shape: Sequence[int] | torch.Size) -> int | None:
    """Number of experts ``E`` for a stacked expert tensor ``[E, ...]``, else None."""
    return _stack_size(parse_param_name(param_name), tuple(shape))


def is_excluded_by_default(loc: ParamLocation) -> bool:
    """Embeddings, all norms, biases and MoE routers are excluded; lm_head is not."""
    return loc.kind == "bias" or loc.component in _EXCLUDED_COMPONENTS


def expert_slices(
    param: torch.Tensor, loc: ParamLocation
) -> list[tuple[int | None, torch.Tensor]]:
    """Per-expert views ``[(e, param[e]), ...]`` of a stacked tensor, else ``[(None, param)]``."""
    n = _stack_size(loc, tuple(param.shape))
    if n is None:
        return [(None, param)]
    return [(e, param[e]) for e in range(n)]
