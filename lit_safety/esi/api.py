"""One-call ESI for use outside Lightning (``compute_safety_mask``) and the pieces it is made of.

    from lit_safety.esi import compute_safety_mask
    mask = compute_safety_mask(model, tokenizer, prompts, objective="refusal", ratio=0.01)
    mask.save("mask.safetensors")
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from lit_safety import __version__
from lit_safety.esi.mask import SafetyMask
from lit_safety.esi.scoring import (
    ParameterFilter,
    accumulate_safety_gradients,
    baseline_scores,
    clear_safety_gradients,
    gradients_to_esi_,
    reverse_order,
    safety_gradient,
    safety_gradient_or_zeros,
    score_dtype,
)
from lit_safety.esi.topk import SCOPES, select_topk

METHODS = ("esi", "bottom", "random", "magnitude", "grad", "snip")
"""``esi`` top-k ESI (the paper); ``bottom`` bottom-k ESI; ``random`` uniformly random k;
``magnitude`` top |W|; ``grad`` top |dS/dw|; ``snip`` top |W * dS/dw|."""

NEEDS_GRADIENTS = {"esi", "bottom", "grad", "snip"}


def check_selection_args(method: str, ratio: float | None, k: int | None, scope: str) -> None:
    """Validate the selection arguments before any model work."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if (ratio is None) == (k is None):
        raise ValueError("give exactly one of ratio (a fraction in (0, 1]) or k (a count)")
    if ratio is not None and not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    if k is not None and k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def selection_scores(method: str, params: dict[str, torch.nn.Parameter], *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Scores to take the top-k of, from the accumulated gradients (:func:`safety_gradient`:
    ``param.grad``, or the float32 buffer of a half-precision parameter).

    For ``esi`` and ``bottom`` the gradient buffers are turned into ESI scores in place (select
    ``bottom`` with :func:`reverse_order` of them).
    """
    if method in ("esi", "bottom"):
        return gradients_to_esi_(params)
    grads = None
    if method in NEEDS_GRADIENTS:
        grads = {n: safety_gradient_or_zeros(p) for n, p in params.items()}
    return baseline_scores(method, params, grads, seed=seed)


def mask_from_scores(
    scores: dict[str, torch.Tensor],
    *,
    ratio: float | None = 0.01,
    k: int | None = None,
    scope: str = "global",
    metadata: dict[str, Any] | None = None,
    report_scores: dict[str, torch.Tensor] | None = None,
) -> SafetyMask:
    """Exact top-k of ``scores`` as a :class:`SafetyMask` (``report_scores`` are the values stored)."""
    result = select_topk(scores, ratio=ratio if k is None else None, k=k, scope=scope)
    values = report_scores if report_scores is not None else scores
    kept_scores = {n: values[n].reshape(-1)[idx].float() for n, idx in result.indices.items()}
    meta = {"scope": scope, "ratio": ratio if k is None else None, "k_requested": k, "N": result.n,
            "k": result.k, "threshold": result.threshold, "score_share": _share(kept_scores, _score_sum(values)),
            "library_version": __version__, **(metadata or {})}
    return SafetyMask(indices=dict(result.indices), shapes={n: tuple(s.shape) for n, s in scores.items()},
                      scores=kept_scores, metadata=meta)


def _score_sum(scores: dict[str, torch.Tensor]) -> float:
    return sum(float(v.double().sum()) for v in scores.values())


def _share(kept_scores: dict[str, torch.Tensor], total: float) -> float | None:
    """Fraction of all the scores (summing to ``total``) held by the selected entries: how
    concentrated the scores are (ESI: the share of the first-order safety sensitivity the top-k covers)."""
    if total <= 0:
        return None
    return _score_sum(kept_scores) / total


def compute_safety_mask(
    model: torch.nn.Module,
    tokenizer: Any = None,
    prompts: Sequence[str] | None = None,
    *,
    objective: str | Any = "refusal",
    method: str = "esi",
    ratio: float | None = 0.01,
    k: int | None = None,
    scope: str = "global",
    targets: Sequence[str] | None = None,
    batches: Iterable[dict[str, Any]] | None = None,
    num_examples: int | None = None,
    param_filter: ParameterFilter | None = None,
    guard_model: Any = None,
    batch_size: int = 8,
    max_length: int = 256,
    seed: int = 0,
    metadata: dict[str, Any] | None = None,
    progress: bool = True,
) -> SafetyMask:
    """Score a model's weights and return the selected top-k as a :class:`SafetyMask`.

    Give either ``prompts`` (+ optional ``targets``: refusals for ``objective="refusal"``,
    harmful targets for ``"compliance"``; a default refusal when omitted) with ``tokenizer``, or
    ready ``batches`` with ``num_examples``. ``method`` picks ESI or a comparison baseline.

    ``objective`` is a name (``refusal``, ``compliance``, ``judge``) or an objective object. The
    judge objective needs a guard: ``objective="judge", guard_model="organism-guard"`` (a hub id
    such as ``meta-llama/Llama-Guard-3-1B``, an HF directory, or a loaded model with its tokenizer
    via ``make_objective``), or for the guard's other options
    ``objective=make_objective("judge", guard_model=..., safe_token=..., guard_response_prefix=...)``.

    Gradients are accumulated and scored in float32 for bfloat16/float16 models (see
    :mod:`lit_safety.esi.scoring`); the mask's scores are float32.
    """
    from lit_safety.esi.objectives import OBJECTIVES, make_objective

    if k is not None:  # a count overrides the default ratio
        ratio = None
    check_selection_args(method, ratio, k, scope)
    if isinstance(objective, str):
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if guard_model is not None and objective != "judge":
            raise ValueError(f"guard_model is used by objective='judge' only, not {objective!r}")
        options = {} if guard_model is None else {"guard_model": guard_model}
        # judge without a guard fails here, before any model work; baselines that need no
        # gradient never use the objective, so it is not built (no guard is loaded) for them
        objective_fn = make_objective(objective, **options) if method in NEEDS_GRADIENTS else None
    else:
        if guard_model is not None:
            raise ValueError("guard_model goes with objective='judge'; this objective object already has its guard")
        objective_fn = objective
    param_filter = param_filter or ParameterFilter()
    params = param_filter.select(model)
    if hasattr(objective_fn, "bind"):
        if tokenizer is None:
            raise ValueError("the judge objective needs the scored model's tokenizer")
        objective_fn.bind(tokenizer)
    if method in NEEDS_GRADIENTS:
        if batches is None:
            if tokenizer is None or not prompts:
                raise ValueError("compute_safety_mask needs a tokenizer and a non-empty list of prompts (or batches)")
            from lit_safety.data.esi import prompt_batches

            batches = prompt_batches(tokenizer, list(prompts), targets, objective=objective_fn,
                                     batch_size=batch_size, max_length=max_length)
            num_examples = len(prompts)
        if not num_examples:
            raise ValueError("num_examples must be given (> 0) with batches")
        accumulate_safety_gradients(model, batches, objective_fn, params, num_examples=num_examples, progress=progress)
    meta = {"method": method, "objective": getattr(objective_fn, "name", str(objective)), "seed": seed,
            "model": getattr(getattr(model, "config", None), "_name_or_path", ""), "num_examples": num_examples,
            **(metadata or {})}
    return select_mask(params, method=method, ratio=ratio, k=k, scope=scope, seed=seed, metadata=meta)


def select_mask(params: dict[str, torch.nn.Parameter], *, method: str, ratio: float | None, k: int | None,
                scope: str, seed: int = 0, metadata: dict[str, Any] | None = None) -> SafetyMask:
    """Scores from the accumulated gradients (:func:`safety_gradient`; or the weights, for the
    baselines that need none), the exact top-k as a mask, then the gradient buffers are released.

    Sharded (FSDP2 DTensor) parameters are scored on each rank's shard and selected with the
    all-reduced histograms of the exact top-k; every rank returns the same full mask.
    """
    from lit_safety.parallel import is_dtensor

    if any(is_dtensor(p) for p in params.values()):
        return _select_mask_sharded(params, method=method, ratio=ratio, k=k, scope=scope, seed=seed,
                                    metadata=metadata)
    scores = selection_scores(method, params, seed=seed)
    select_on = reverse_order(scores) if method == "bottom" else _selectable(scores)
    mask = mask_from_scores(select_on, ratio=ratio, k=k, scope=scope, metadata=metadata, report_scores=scores)
    clear_safety_gradients(params)
    return mask


def _selectable(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """float64 scores (float64 models) are selected on their float32 rounding: the radix top-k works
    on float32 bit patterns, and rounding keeps the order (values equal in float32 tie-break by position)."""
    return {n: v.float() if v.dtype == torch.float64 else v for n, v in scores.items()}


def _sharded_scores(method: str, params: dict[str, torch.nn.Parameter], seed: int) -> dict[str, torch.Tensor]:
    """This rank's slice of exactly the scores :func:`selection_scores` gives on the full model.

    sigma(W) is computed on the gathered full tensor (one at a time) with the single-process code,
    so it is bit-identical; random scores are drawn for the full shape and sliced likewise.
    """
    from lit_safety.esi.scoring import parameter_std
    from lit_safety.parallel import local_shard, row_range

    generator = torch.Generator().manual_seed(seed) if method == "random" else None
    scores = {}
    for name, p in params.items():
        local, offset, _ = local_shard(p.detach())
        grad = safety_gradient(p)  # float32 for half-precision parameters
        local_grad = local_shard(grad)[0] if grad is not None else torch.zeros(local.shape, dtype=score_dtype(p),
                                                                              device=local.device)
        if method in ("esi", "bottom"):
            std = parameter_std(p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach(), name)
            if std.dim() == 3:  # one sigma per expert: keep this shard's experts (rows)
                first, rows = row_range(p)
                std = std[first:first + rows]
            scores[name] = (local_grad * std).abs()
        elif method == "random":
            full = torch.rand(p.shape, generator=generator)
            scores[name] = full.reshape(-1)[offset:offset + local.numel()].reshape(local.shape).to(local.device)
        elif method == "magnitude":
            scores[name] = local.float().abs()
        elif method == "grad":
            scores[name] = local_grad.float().abs()
        elif method == "snip":
            scores[name] = (local_grad.float() * local.float()).abs()
        else:
            raise ValueError(f"unknown selection method {method!r}")
    return scores


def _select_mask_sharded(params: dict[str, torch.nn.Parameter], *, method: str, ratio: float | None,
                         k: int | None, scope: str, seed: int, metadata: dict[str, Any] | None) -> SafetyMask:
    import torch.distributed as dist

    from lit_safety.esi.topk import select_topk
    from lit_safety.parallel import local_shard

    scores = _sharded_scores(method, params, seed)
    offsets = {n: local_shard(p)[1] for n, p in params.items()}
    full_numel = {n: p.numel() for n, p in params.items()}
    select_on = reverse_order(scores) if method == "bottom" else _selectable(scores)
    result = select_topk(select_on, ratio=ratio if k is None else None, k=k, scope=scope, offsets=offsets,
                         full_numel=full_numel)
    local = {n: (idx.cpu(), scores[n].reshape(-1)[idx - offsets[n]].float().cpu()) for n, idx in result.indices.items()}
    gathered: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, local)
    indices, kept = {}, {}
    for name in params:
        parts = sorted((part[name] for part in gathered if name in part), key=lambda t: int(t[0][0]))
        if parts:
            indices[name] = torch.cat([i for i, _ in parts])
            kept[name] = torch.cat([v for _, v in parts])
    clear_safety_gradients(params)
    device = next(iter(scores.values())).device
    total = torch.tensor(_score_sum(scores), dtype=torch.float64, device=device)
    dist.all_reduce(total)
    meta = {"scope": scope, "ratio": ratio if k is None else None, "k_requested": k, "N": result.n, "k": result.k,
            "threshold": result.threshold, "score_share": _share(kept, float(total)),
            "library_version": __version__, "world_size": dist.get_world_size(), "sharded": True, **(metadata or {})}
    return SafetyMask(indices=indices, shapes={n: tuple(p.shape) for n, p in params.items()}, scores=kept,
                      metadata=meta)
