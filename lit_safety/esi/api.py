"""One-call ESI on a list of prompts, for use outside Lightning (``compute_safety_mask``).

    from lit_safety.esi import compute_safety_mask
    mask = compute_safety_mask(model, tokenizer, prompts, objective="refusal", ratio=0.01)
    mask.save("mask.safetensors")

It builds the batches from prompts and runs :func:`lit_safety.esi.selection.select_weights`, the
pipeline every way of selecting weights goes through.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import fields, replace
from typing import Any

import torch

from lit_safety.data.esi import prompt_batches
from lit_safety.esi.mask import SafetyMask
from lit_safety.esi.selection import SelectionConfig, select_weights

_SELECTION_FIELDS = {f.name for f in fields(SelectionConfig)}


def compute_safety_mask(
    model: torch.nn.Module,
    tokenizer: Any = None,
    prompts: Sequence[str] | None = None,
    *,
    selection: SelectionConfig | None = None,
    targets: Sequence[str] | None = None,
    batches: Iterable[dict[str, Any]] | None = None,
    objective: str | Any = None,
    batch_size: int = 8,
    max_length: int = 256,
    metadata: dict[str, Any] | None = None,
    progress: bool = True,
    **options: Any,
) -> SafetyMask:
    """Score a model's weights and return the selected top-k as a :class:`SafetyMask`.

    The selection is ``selection`` (a :class:`SelectionConfig`) with ``options`` (its fields, e.g.
    ``method="random", ratio=0.05, k=100, objective="compliance", guard_model="organism-guard"``)
    set on top of it. Give either ``prompts`` (+ optional ``targets``: refusals for the ``refusal``
    objective, harmful targets for ``compliance``; a default refusal when omitted) with
    ``tokenizer``, or ready ``batches``. ``objective`` may be an objective object, e.g.
    ``make_objective("judge", guard_model=model, guard_tokenizer=tok, ...)`` for a loaded guard;
    it replaces the config's objective.

    Gradients are accumulated and scored in float32 for bfloat16/float16 models (see
    :mod:`lit_safety.esi.scoring`); the mask's scores are float32.
    """
    unknown = sorted(set(options) - _SELECTION_FIELDS)
    if unknown:
        raise TypeError(f"compute_safety_mask: unknown option(s) {unknown}; the selection options are "
                        f"{sorted(_SELECTION_FIELDS)}")
    if "k" in options and "ratio" not in options and options["k"] is not None:
        options["ratio"] = None  # a count overrides the default ratio
    if isinstance(objective, str):  # a name: the config's field
        options["objective"], objective = objective, None
    elif objective is not None and options.get("guard_model") is not None:
        raise ValueError("guard_model goes with objective='judge'; this objective object already has its guard")
    config = replace(selection, **options) if selection is not None else SelectionConfig(**options)
    config.check_size(model)  # k against the scored weights, before a guard is loaded or any gradient
    objective_fn = objective if objective is not None else config.make_objective()
    if config.needs_gradients and batches is None:
        if tokenizer is None or not prompts:
            raise ValueError("compute_safety_mask needs a tokenizer and a non-empty list of prompts (or batches)")
        batches = prompt_batches(tokenizer, list(prompts), targets, objective=objective_fn,
                                 batch_size=batch_size, max_length=max_length)
    return select_weights(model, batches, config, objective=objective_fn, tokenizer=tokenizer, metadata=metadata,
                          progress=progress)
