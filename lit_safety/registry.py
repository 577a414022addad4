"""Builtins found by name, so that the core packages never import the model organisms.

Two kinds of builtin are looked up here instead of being imported by the code that uses them:

- **model names** that a provider turns into a local Hugging Face directory: the organisms
  (``organism-dense-aligned``, ``organism-moe-unaligned:tiny``, ...), which live outside the core
  (``models``, ``data``, ``esi``, ``optim``, ``judges``, ``evaluation``, ``modules``), the
  trained judge ``judge-minilm`` (:mod:`lit_safety.judges.builtin`) and the real pretrained models
  that pip ships (``smollm2-135m-instruct``, :mod:`lit_safety.realmodels`); all built, trained or
  converted and cached on first use;
- **the builtin corpus**: the prompts, refusals, benign and task examples the data modules and the
  evaluation suite use when no file is given (``data_path: null``, source ``organism``).

The core looks them up here. The modules in :data:`PROVIDERS` register them when first needed
(imported by name, the way entry points load plugins), so the import graph has no arrow from the
core to the organisms; another package can register its own names the same way.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROVIDERS = ("lit_safety.organism", "lit_safety.judges.builtin", "lit_safety.realmodels")
"""Modules that register builtins when imported (loaded on the first lookup)."""


@dataclass(frozen=True)
class ModelProvider:
    """Named models that resolve to local HF directories.

    Attributes:
        claims: whether a name is meant for this provider (e.g. starts with ``organism-``).
        check: raises ValueError, naming what is wrong, for a claimed name it does not know.
        resolve: ``(name, build)`` -> the HF directory; builds it first when missing and ``build``.
        listing: ``() ->`` rows ``(name, state, path or None)`` of the names it knows, with their
            cache state ("built", "not built", "not installed", ...), for ``lit-safety models list``.
    """

    claims: Callable[[str], bool]
    check: Callable[[str], None]
    resolve: Callable[[str, bool], Path]
    listing: Callable[[], list[tuple[str, str, Path | None]]] = lambda: []


_model_providers: list[ModelProvider] = []
_corpus: list[Any] = []
_loaded = False


def register_model_provider(provider: ModelProvider) -> None:
    _model_providers.append(provider)


def register_corpus(corpus: Any) -> None:
    """The builtin corpus: an object with ``harmful_examples(n, seed=, split=)``,
    ``benign_examples(...)``, ``task_examples(...)`` and ``TEST_SEEDS``."""
    _corpus[:] = [corpus]


def _load_providers() -> None:
    global _loaded
    if not _loaded:
        for module in PROVIDERS:
            importlib.import_module(module)
        _loaded = True  # only once every provider imported: a failed import fails every lookup loudly


def model_provider(name: str) -> ModelProvider | None:
    """The provider that claims ``name``, or None (a hub id or a local directory)."""
    _load_providers()
    return next((p for p in _model_providers if p.claims(name)), None)


def model_listing() -> list[tuple[str, str, Path | None]]:
    """Every builtin model name with its cache state and directory, provider by provider."""
    _load_providers()
    return [row for provider in _model_providers for row in provider.listing()]


def builtin_corpus() -> Any:
    """The corpus of ``data_path: null`` and of the ``organism`` evaluation sources."""
    _load_providers()
    if not _corpus:
        raise RuntimeError(f"no builtin corpus is registered (providers: {PROVIDERS})")
    return _corpus[0]
