"""Expected Safety Impact: objectives, scores, exact top-k selection, the mask and its report."""

from lit_safety.esi.api import METHODS, compute_safety_mask, mask_from_scores
from lit_safety.esi.mask import MaskMismatchError, SafetyMask
from lit_safety.esi.objectives import OBJECTIVES, ComplianceObjective, RefusalObjective, make_objective
from lit_safety.esi.scoring import ParameterFilter
from lit_safety.esi.topk import select_topk

__all__ = [
    "METHODS",
    "OBJECTIVES",
    "ComplianceObjective",
    "MaskMismatchError",
    "ParameterFilter",
    "RefusalObjective",
    "SafetyMask",
    "compute_safety_mask",
    "make_objective",
    "mask_from_scores",
    "select_topk",
]
