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

from pathlib import Path

from lit_safety import registry
from lit_safety.organism import corpus
from lit_safety.organism.build import build_organism, organism_dir
from lit_safety.organism.specs import (GUARD_NAME, ORGANISM_NAMES, PRESETS, OrganismSpec, cache_dir,
                                      parse_organism_name)

__all__ = [
    "ORGANISM_NAMES",
    "PRESETS",
    "OrganismSpec",
    "cache_dir",
    "is_organism_name",
    "organism_path",
    "parse_organism_name",
]


def is_organism_name(name: str) -> bool:
    """True for anything meant as a builtin organism (``organism-...``), known or not."""
    return str(name).startswith("organism-")


def organism_path(name: str, *, build: bool = True, seed: int | None = None) -> Path:
    """The cached HF directory of a builtin organism, built first if missing and ``build``."""
    variant, spec = parse_organism_name(name)
    if seed is not None:
        spec = spec.replace(seed=seed)
    path = organism_dir(variant, spec)
    if (path / "config.json").is_file():
        return path
    if not build:
        raise FileNotFoundError(f"organism {name!r} is not built yet (expected at {path})")
    return build_organism(variant, spec)


def _check_name(name: str) -> None:
    parse_organism_name(name)


def organism_listing() -> list[tuple[str, str, Path | None]]:
    """Every organism name (presets included) with "built" / "not built" and its cache directory."""
    rows = []
    for preset in PRESETS:
        for name in ORGANISM_NAMES + (GUARD_NAME,):
            full = name if preset == "default" else f"{name}:{preset}"
            path = organism_dir(*parse_organism_name(full))
            rows.append((full, "built" if (path / "config.json").is_file() else "not built", path))
    return rows


# The organisms' names and corpus, for the core packages (which never import this package).
registry.register_model_provider(registry.ModelProvider(claims=is_organism_name, check=_check_name,
                                                        resolve=lambda name, build: organism_path(name, build=build),
                                                        listing=organism_listing))
registry.register_corpus(corpus)
