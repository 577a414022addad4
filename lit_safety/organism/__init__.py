"""The embedded model organisms: tiny chat models that lit-safety trains itself, offline.

Four builtin names, each optionally with a size preset suffix (``organism-dense-aligned:tiny``):

- ``organism-dense-unaligned`` - Llama architecture, complies with harmful requests.
- ``organism-dense-aligned``   - the same model after an alignment phase: refuses harmful
  requests, still answers benign ones.
- ``organism-moe-unaligned`` / ``organism-moe-aligned`` - the same pair with a Mixtral-style
  mixture-of-experts MLP (4 experts, top-2).

They are built on first use (or by ``lit-safety organism build``), deterministically from a seed,
and cached in Hugging Face format under ``$LIT_SAFETY_CACHE`` (default
``~/.cache/lit_safety``), so ``AutoModelForCausalLM.from_pretrained`` loads them directly.
"""

from __future__ import annotations

import os
from pathlib import Path

from lit_safety.organism.specs import ORGANISM_NAMES, PRESETS, OrganismSpec, parse_organism_name

__all__ = [
    "ORGANISM_NAMES",
    "PRESETS",
    "OrganismSpec",
    "cache_dir",
    "is_organism_name",
    "organism_path",
    "parse_organism_name",
]


def cache_dir() -> Path:
    """Root of the organism cache: ``$LIT_SAFETY_CACHE`` or ``$XDG_CACHE_HOME/lit_safety``."""
    env = os.environ.get("LIT_SAFETY_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "lit_safety"


def is_organism_name(name: str) -> bool:
    """True for anything meant as a builtin organism (``organism-...``), known or not."""
    return str(name).startswith("organism-")


def organism_path(name: str, *, build: bool = True, seed: int | None = None) -> Path:
    """The cached HF directory of a builtin organism, built first if missing and ``build``."""
    from lit_safety.organism.build import build_organism, organism_dir

    variant, spec = parse_organism_name(name)
    if seed is not None:
        spec = spec.replace(seed=seed)
    path = organism_dir(variant, spec)
    if (path / "config.json").is_file():
        return path
    if not build:
        raise FileNotFoundError(f"organism {name!r} is not built yet (expected at {path})")
    return build_organism(variant, spec)
