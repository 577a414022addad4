"""Judges: (prompt, response) -> Verdict. ``keyword`` (refusal strings), ``guard`` (Llama-Guard-style
causal LM), ``classifier`` (HF sequence classifier), ``api`` (OpenAI-compatible endpoint)."""

from __future__ import annotations

from lit_safety import lazy_attributes

_LAZY = {
    "Judge": "lit_safety.judges.base",
    "Verdict": "lit_safety.judges.base",
    "KeywordJudge": "lit_safety.judges.keyword",
    "GuardJudge": "lit_safety.judges.guard",
    "ClassifierJudge": "lit_safety.judges.classifier",
    "ApiJudge": "lit_safety.judges.api",
    "default_judge": "lit_safety.judges.builtin",
}


# the model judges pull in transformers only when used
__getattr__ = lazy_attributes(_LAZY, __name__)

__all__ = list(_LAZY)
