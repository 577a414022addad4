"""Judges: (prompt, response) -> Verdict. ``keyword`` (refusal strings), ``guard`` (Llama-Guard-style
causal LM), ``classifier`` (HF sequence classifier), ``api`` (OpenAI-compatible endpoint)."""

from __future__ import annotations

_LAZY = {
    "Judge": "lit_safety.judges.base",
    "Verdict": "lit_safety.judges.base",
    "KeywordJudge": "lit_safety.judges.keyword",
    "GuardJudge": "lit_safety.judges.guard",
    "ClassifierJudge": "lit_safety.judges.classifier",
    "ApiJudge": "lit_safety.judges.api",
}


def __getattr__(name: str):
    """Import lazily: the model judges pull in transformers only when used."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lit_safety.judges' has no attribute {name!r}")


__all__ = list(_LAZY)
