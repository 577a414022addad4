"""lit-safety: find (ESI) and intervene on (SET, SPA) the safety-critical parameters of causal LMs."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "ESIScoringModule": "lit_safety.modules.esi",
    "CausalLMModule": "lit_safety.modules.base",
    "SafetyInterventionModule": "lit_safety.modules.intervention",
    "SafetyEvalModule": "lit_safety.modules.evaluation",
    "JudgeEvalModule": "lit_safety.modules.judge_eval",
    "JudgeTrainingModule": "lit_safety.modules.judge",
    "SafetyPreservingCallback": "lit_safety.callbacks",
    "SafetyEvalCallback": "lit_safety.callbacks",
    "SafetyEvaluator": "lit_safety.evaluation.evaluator",
    "SuiteConfig": "lit_safety.evaluation.suite",
    "SafetyMask": "lit_safety.esi.mask",
    "compute_safety_mask": "lit_safety.esi.api",
    "SelectionConfig": "lit_safety.esi.selection",
    "select_weights": "lit_safety.esi.selection",
    "load_model": "lit_safety.models.loading",
    "load_tokenizer": "lit_safety.models.loading",
    "load_model_and_tokenizer": "lit_safety.models.loading",
}


def lazy_attributes(table: dict[str, str], package: str):
    """A module ``__getattr__`` that imports ``name`` from ``table[name]`` on first access, so that
    importing a package stays cheap (no torch/Lightning/transformers until a class is used)."""

    def __getattr__(name: str):
        if name in table:
            return getattr(importlib.import_module(table[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


__getattr__ = lazy_attributes(_LAZY, __name__)


__all__ = ["__version__", *_LAZY]
