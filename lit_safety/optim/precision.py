"""Refuse to train half-precision weights that have no float32 master copy.

An optimizer that updates bf16 weights in place loses every step smaller than half a bf16 ulp:
for weights of ~0.02 (ulp 1.2e-4) and lr 2e-5, AdamW's ~lr-sized steps mostly round away (measured:
30% of the entries moved in 10 steps, against 100% with float32 masters), and training silently
does little. lit-safety's :class:`~lit_safety.optim.SparseAdamW` keeps float32 masters of its k
entries, so SET on bf16 weights is fine; every dense optimizer (SPA, full fine-tuning, and
bitsandbytes' 8-bit AdamW, which has no masters either) needs float32 parameters, with bf16 as a
compute type only (``trainer.precision: bf16-mixed``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from lit_safety.esi.scoring import HALF_DTYPES

__all__ = ["HALF_DTYPES", "check_float32_master", "float32_master_problem"]


def float32_master_problem(named_params: Iterable[tuple[str, torch.Tensor]], *, what: str) -> str | None:
    """Why training the trainable bf16/fp16 parameters in place loses updates, or ``None`` if none is.

    ``what`` names the training for the message (e.g. ``"intervention=spa with optimizer adamw"``).
    """
    half = [(n, p.dtype) for n, p in named_params if p.requires_grad and p.dtype in HALF_DTYPES]
    if not half:
        return None
    name, dtype = half[0]
    return (f"{what} would update {len(half)} {str(dtype).replace('torch.', '')} parameter tensor(s) (e.g. {name!r}) "
            "in place, without float32 master values: steps below half a bf16 ulp are lost (lr 2e-5 moves only ~30% "
            "of the entries of ~0.02-sized weights). Load the model in float32 (model.dtype: float32) and compute in "
            "bf16 with trainer.precision: bf16-mixed; with precision bf16-true use intervention=set, whose sparse AdamW keeps "
            "float32 masters of the selected entries.")


def check_float32_master(named_params: Iterable[tuple[str, torch.Tensor]], *, what: str) -> None:
    """Raise ``ValueError`` if a trainable parameter is bf16/fp16 (see :func:`float32_master_problem`)."""
    problem = float32_master_problem(named_params, what=what)
    if problem:
        raise ValueError(problem)
