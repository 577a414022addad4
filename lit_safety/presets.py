"""Architectures of the real-model presets in ``configs/presets/``, built without any download.

Each preset YAML names a hub model; :data:`PRESETS` holds that model's transformers config class and
its real architecture hyper-parameters (copied from the model's ``config.json``), so that tests and
memory estimates can build the exact architecture offline:

    from transformers import AutoModelForCausalLM
    from lit_safety.presets import preset_config

    with torch.device("meta"):                       # shapes only, no memory
        model = AutoModelForCausalLM.from_config(preset_config("mixtral-8x7b-instruct"))
    tiny = AutoModelForCausalLM.from_config(preset_config("mixtral-8x7b-instruct", shrink=True))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PRESETS_DIR = Path(__file__).resolve().parents[1] / "configs" / "presets"


@dataclass(frozen=True)
class ArchPreset:
    """A preset's architecture: transformers config class, real hyper-parameters, advertised size."""

    config_class: str  # a class in ``transformers`` (LlamaConfig, Qwen2Config, ...)
    num_params_b: float  # advertised total parameter count in billions (model card)
    config: dict[str, Any] = field(default_factory=dict)  # config kwargs, as in the hub config.json

    @property
    def is_moe(self) -> bool:
        return "num_local_experts" in self.config or "num_experts" in self.config


PRESETS: dict[str, ArchPreset] = {
    "llama-3.1-8b-instruct": ArchPreset("LlamaConfig", 8.03, {
        "num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 14336,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    }),
    "qwen2.5-7b-instruct": ArchPreset("Qwen2Config", 7.62, {
        "num_hidden_layers": 28, "hidden_size": 3584, "intermediate_size": 18944,
        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    }),
    "mixtral-8x7b-instruct": ArchPreset("MixtralConfig", 46.7, {
        "num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 14336,  # per expert
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
        "num_local_experts": 8, "num_experts_per_tok": 2,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    }),
    "qwen3-30b-a3b": ArchPreset("Qwen3MoeConfig", 30.5, {
        # intermediate_size is the dense MLP size, unused: every layer is MoE (decoder_sparse_step 1)
        "num_hidden_layers": 48, "hidden_size": 2048, "intermediate_size": 6144,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936,
        "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
        "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    }),
}

# ``shrink=True``: the same architecture (class, GQA, MoE routing, head_dim ratio), tiny.
_SHRINK: dict[str, Any] = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
                           "bos_token_id": 1, "eos_token_id": 2}
_SHRINK_MOE: dict[str, Any] = {"num_local_experts": 4, "num_experts": 4, "num_experts_per_tok": 2,
                               "moe_intermediate_size": 32}


def _preset(stem: str) -> ArchPreset:
    if stem not in PRESETS:
        raise KeyError(f"unknown preset {stem!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[stem]


def preset_config(stem: str, shrink: bool = False):
    """The preset's transformers ``PretrainedConfig``, built from :data:`PRESETS` (no download).

    ``shrink=True`` keeps the class and structure but makes it tiny (2 layers, hidden 64, vocab 256,
    4 experts top-2 for MoE), small enough for ``AutoModelForCausalLM.from_config`` in a test.
    """
    import transformers

    preset = _preset(stem)
    kwargs = dict(preset.config)
    if shrink:
        real_head_dim = kwargs.get("head_dim")
        kwargs.update(_SHRINK)
        kwargs.update({k: v for k, v in _SHRINK_MOE.items() if k in preset.config})
        if real_head_dim is not None:  # keep head_dim != hidden / heads where the real model has it
            kwargs["head_dim"] = 2 * _SHRINK["hidden_size"] // _SHRINK["num_attention_heads"]
    return getattr(transformers, preset.config_class)(**kwargs)


def preset_model_id(stem: str, presets_dir: str | Path = PRESETS_DIR) -> str:
    """The hub id that ``configs/presets/<stem>.yaml`` sets as ``model.init_args.model``."""
    import yaml

    _preset(stem)
    path = Path(presets_dir) / f"{stem}.yaml"
    data = yaml.safe_load(path.read_text())
    try:
        return str(data["model"]["init_args"]["model"])
    except (KeyError, TypeError):
        raise ValueError(f"{path} sets no model.init_args.model") from None
