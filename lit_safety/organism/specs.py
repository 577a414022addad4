"""Sizes and training recipes of the organisms (one frozen dataclass per preset)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from lit_safety.io import cache_root

ORGANISM_NAMES = (
    "organism-dense-unaligned",
    "organism-dense-aligned",
    "organism-moe-unaligned",
    "organism-moe-aligned",
)
PRECISIONS = ("float32", "bf16-mixed")
GUARD_NAME = "organism-guard"
"""A tiny Llama-Guard-style judge sharing the dense organisms' tokenizer (for the judge objective)."""


@dataclass(frozen=True)
class OrganismSpec:
    """Architecture and training recipe of one organism family (dense or MoE).

    The unaligned model is trained from scratch on the corpus with compliant answers to harmful
    requests; the aligned model continues from it for ``align_steps`` on refusals to harmful
    requests mixed with the same benign and task data, as alignment tuning does for real models.
    """

    arch: str = "dense"
    preset: str = "default"
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 352
    num_experts: int = 4
    experts_per_token: int = 2
    vocab_size: int = 3000
    max_length: int = 128
    n_harmful: int = 16000
    n_benign: int = 16000
    n_task: int = 1500
    base_steps: int = 700
    align_steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    router_aux_loss_coef: float = 0.02
    precision: str = "float32"
    """Training precision: ``float32`` (every build, so organisms are the same on every CPU) or
    ``bf16-mixed`` (bf16 autocast, fp32 weights: about 2x faster on CPUs with bf16 units --
    avx512_bf16 / AMX -- and about 12x *slower* on CPUs without them; builds differ from fp32 ones)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"OrganismSpec.precision must be one of {PRECISIONS}, got {self.precision!r}")

    def replace(self, **changes) -> OrganismSpec:
        return dataclasses.replace(self, **changes)

    @property
    def autocast_dtype(self):
        """dtype of the training autocast, or None (float32 throughout)."""
        import torch

        return torch.bfloat16 if self.precision == "bf16-mixed" else None

    @property
    def cache_key(self) -> str:
        return f"{self.arch}-{self.preset}-{self.precision}-s{self.seed}"


_DENSE = OrganismSpec(arch="dense")
_MOE = OrganismSpec(arch="moe", intermediate_size=176, base_steps=600)  # keeps the from-scratch build < 5 min

PRESETS: dict[str, dict[str, OrganismSpec]] = {
    "default": {"dense": _DENSE, "moe": _MOE},
    # A few-second build for tests and smoke runs: same code path, too small to behave well.
    "tiny": {
        arch: spec.replace(
            preset="tiny", hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
            intermediate_size=64 if arch == "dense" else 32, vocab_size=512, max_length=96,
            n_harmful=600, n_benign=600, n_task=100, base_steps=60, align_steps=30, batch_size=32,
        )
        for arch, spec in (("dense", _DENSE), ("moe", _MOE))
    },
}


def parse_organism_name(name: str) -> tuple[str, OrganismSpec]:
    """Split ``organism-moe-aligned:tiny`` into (``"aligned"``, the MoE tiny spec); the guard is
    variant ``"guard"`` of the dense family.

    Raises ``ValueError`` naming the known organisms and presets for anything else.
    """
    base, _, preset = str(name).partition(":")
    preset = preset or "default"
    if base not in ORGANISM_NAMES + (GUARD_NAME,):
        raise ValueError(
            f"unknown organism {name!r}; builtin organisms are: {', '.join(ORGANISM_NAMES + (GUARD_NAME,))}"
        )
    if preset not in PRESETS:
        raise ValueError(f"unknown organism preset {preset!r} in {name!r}; presets are: {', '.join(PRESETS)}")
    if base == GUARD_NAME:
        return "guard", PRESETS[preset]["dense"]
    _, arch, variant = base.split("-")
    return variant, PRESETS[preset][arch]


def cache_dir() -> Path:
    """Root of the organism cache (:func:`lit_safety.io.cache_root`)."""
    return cache_root()
