"""Optimizers for interventions on the safety-critical entries of a :class:`SafetyMask`.

* SET (train only the selected entries): :class:`SparseAdamW` with O(k) state, after
  :func:`prepare_model` made only the masked parameters trainable.
* SPA (train everything except them): any optimizer plus :class:`FrozenEntries`, which keeps the
  selected entries bit-identical.
* Dense optimizers need float32 parameters (:func:`check_float32_master`); SparseAdamW keeps
  float32 masters of its entries itself.
"""

from lit_safety.optim.frozen import FrozenEntries
from lit_safety.optim.precision import check_float32_master
from lit_safety.optim.sparse_adamw import SparseAdamW, masked_parameters, named_parameters_of, prepare_model

__all__ = ["check_float32_master", "FrozenEntries", "SparseAdamW", "masked_parameters", "named_parameters_of", "prepare_model"]
