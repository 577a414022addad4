"""lit-safety: find (ESI) and intervene on (SET, SPA) the safety-critical parameters of causal LMs."""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "ESIScoringModule": "lit_safety.modules.esi",
    "CausalLMModule": "lit_safety.modules.base",
    "SafetyInterventionModule": "lit_safety.modules.intervention",
    "SafetyEvalModule": "lit_safety.modules.evaluation",
    "SafetyPreservingCallback": "lit_safety.callbacks",
    "SafetyEvalCallback": "lit_safety.callbacks",
    "SafetyEvaluator": "lit_safety.evaluation.evaluator",
    "SafetyMask": "lit_safety.esi.mask",
    "compute_safety_mask": "lit_safety.esi.api",
    "load_model": "lit_safety.models.loading",
    "load_tokenizer": "lit_safety.models.loading",
    "load_model_and_tokenizer": "lit_safety.models.loading",
}


def __getattr__(name: str):
    """Import the public classes lazily: ``import lit_safety`` stays cheap (no torch/Lightning)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lit_safety' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
