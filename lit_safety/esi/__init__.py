"""Expected Safety Impact: objectives, scores, the selection pipeline, exact top-k, the mask and its report."""

from lit_safety.esi.api import compute_safety_mask
from lit_safety.esi.mask import MaskMismatchError, SafetyMask
from lit_safety.esi.objectives import OBJECTIVES, ComplianceObjective, RefusalObjective, make_objective
from lit_safety.esi.scoring import ParameterFilter
from lit_safety.esi.selection import METHODS, SelectionConfig, WeightSelector, mask_from_scores, select_weights
from lit_safety.esi.topk import select_topk

__all__ = [
    "METHODS",
    "OBJECTIVES",
    "ComplianceObjective",
    "MaskMismatchError",
    "ParameterFilter",
    "RefusalObjective",
    "SafetyMask",
    "SelectionConfig",
    "WeightSelector",
    "compute_safety_mask",
    "make_objective",
    "mask_from_scores",
    "select_topk",
    "select_weights",
]
