"""Which weights are safety-critical: one :class:`SelectionConfig`, one pipeline.

    from lit_safety.esi import SelectionConfig, select_weights
    mask = select_weights(model, batches, SelectionConfig(method="esi", ratio=0.01))

The pipeline, in the order it runs (:class:`WeightSelector`; :func:`select_weights` is the one call
that drives it over a list of batches, and ``ESIScoringModule`` drives the same object from
Lightning's training loop, where DDP/FSDP2 reduce the gradients):

1. set up: the parameters the config's filter accepts are the only ones that require grad; the
   model is put in eval mode (the gradient of the deployed model: no dropout); half-precision
   weights accumulate their gradients in float32 (:class:`~lit_safety.esi.scoring.Float32Gradients`);
2. :meth:`WeightSelector.accumulate` per batch: the backward of the summed objective (padding
   copies of weight 0 count for nothing);
3. :meth:`WeightSelector.select`: the examples are counted over ranks (``reduce``), the gradients
   become dS/dw of the mean objective, every weight is scored
   (:func:`~lit_safety.esi.scoring.method_scores`, full tensors and FSDP2 shards alike), and the
   exact top-k becomes a :class:`~lit_safety.esi.mask.SafetyMask`; the gradient buffers and the
   ``requires_grad`` flags are restored.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lit_safety import __version__
from lit_safety.esi.mask import SafetyMask
from lit_safety.esi.objectives import JUDGE_NEEDS_GUARD, OBJECTIVES, make_objective
from lit_safety.esi.scoring import (
    Float32Gradients,
    ParameterFilter,
    clear_safety_gradients,
    method_scores,
    reverse_order,
    scale_safety_gradients_,
    weighted_values,
)
from lit_safety.esi.topk import SCOPES, check_selection_size, select_topk
from lit_safety.generation import progress_bar
from lit_safety.parallel import is_dtensor

METHODS = ("esi", "bottom", "random", "magnitude", "grad", "snip")
"""``esi`` top-k ESI (the paper); ``bottom`` bottom-k ESI; ``random`` uniformly random k;
``magnitude`` top |W|; ``grad`` top |dS/dw|; ``snip`` top |W * dS/dw|."""

NEEDS_GRADIENTS = frozenset({"esi", "bottom", "grad", "snip"})


@dataclass(frozen=True)
class SelectionConfig:
    """Which weights to select, how many, among which parameters, by which safety objective."""

    method: str = "esi"
    """``esi`` (top-k Expected Safety Impact |sigma(W) * dS/dw|, the paper), or a baseline: ``bottom``
    (bottom-k ESI), ``random`` (uniformly random k), ``magnitude`` (top |W|), ``grad`` (top |dS/dw|),
    ``snip`` (top |W * dS/dw|)."""
    ratio: float | None = 0.01
    """Fraction of the scored weights to select, in (0, 1] (the paper: 0.01). Ignored when ``k`` is set."""
    k: int | None = None
    """Number of weights to select instead of a ratio."""
    scope: str = "global"
    """``global`` (one top-k over all scored weights), ``per_tensor`` (the same share of every
    matrix) or ``per_row``."""
    include: list[str] | None = None
    """Regexes of parameter names to score (default: every decoder weight matrix)."""
    exclude: list[str] | None = None
    """Regexes of parameter names never scored (applied after ``include``)."""
    include_lm_head: bool = False
    """Score the output projection too (off: its vocab x hidden matrix dominates small models)."""
    all_parameters: bool = False
    """Score every parameter: embeddings, norms, biases, MoE routers and the output projection too."""
    objective: str = "refusal"
    """The safety objective S: ``refusal`` (log-likelihood of refusing the harmful prompt),
    ``compliance`` (minus the log-likelihood of the harmful target) or ``judge`` (a guard model's
    "safe" logit on the model's own Gumbel-relaxed answer; needs ``guard_model``)."""
    guard_model: str | None = None
    """Guard of ``objective: judge``: hub id (e.g. meta-llama/Llama-Guard-3-1B), local HF directory or
    ``organism-guard``."""
    guard_safe_token: str = "safe"
    """The guard's "safe" verdict token."""
    guard_unsafe_token: str | None = "unsafe"
    """The guard's "unsafe" verdict token (null: the judge objective uses the safe logit alone)."""
    guard_response_prefix: str = ""
    """Text the guard emits before its verdict ("\\n\\n" for Llama Guard 3)."""
    gumbel_temperature: float = 0.3
    """Gumbel-softmax temperature of the judge objective."""
    judge_max_new_tokens: int = 32
    """Length of the answers the judge objective generates."""
    seed: int = 0
    """Seed of the ``random`` baseline, of the judge objective's Gumbel noise and of the sample of
    harmful prompts a training run scores."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"selection.method must be one of {METHODS}, got {self.method!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"selection.scope must be one of {SCOPES}, got {self.scope!r}")
        if self.k is not None:
            if self.k < 1:
                raise ValueError(f"selection.k must be >= 1, got {self.k}")
        elif self.ratio is None:
            raise ValueError("selection: give ratio (a fraction in (0, 1]) or k (a count)")
        elif not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"selection.ratio must be in (0, 1], got {self.ratio}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"selection.objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.objective == "judge" and self.needs_gradients and not self.guard_model:
            raise ValueError(f"{JUDGE_NEEDS_GUARD}; in a config: selection.guard_model")
        if self.guard_model and self.objective != "judge":
            raise ValueError(f"selection.guard_model is used by objective=judge only, not {self.objective!r}")
        for pattern in list(self.include or []) + list(self.exclude or []):
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"selection.include/exclude: bad regex {pattern!r}: {err}") from err

    @property
    def needs_gradients(self) -> bool:
        """Whether the method scores with dS/dw (``random`` and ``magnitude`` need no data)."""
        return self.method in NEEDS_GRADIENTS

    @property
    def top_k(self) -> tuple[float | None, int | None]:
        """(ratio, k) as the top-k takes them: a count overrides the ratio."""
        return (None, self.k) if self.k is not None else (self.ratio, None)

    def check_size(self, model: torch.nn.Module) -> int:
        """Check ``k`` (or ``ratio``) against the weights this selection scores in ``model`` (its
        parameter filter and scope; :func:`~lit_safety.esi.topk.check_selection_size`), cheaply and
        before any gradient pass: a ``ValueError`` naming ``selection.k`` and the count. Returns N."""
        params = self.parameter_filter().select(model)
        ratio, k = self.top_k
        return check_selection_size({name: tuple(p.shape) for name, p in params.items()}, ratio=ratio, k=k,
                                    scope=self.scope, what="selection.k")

    def parameter_filter(self) -> ParameterFilter:
        return ParameterFilter(include=self.include, exclude=self.exclude or [],
                               include_lm_head=self.include_lm_head, keep_default_exclusions=not self.all_parameters)

    def make_objective(self, *, trust_remote_code: bool = False) -> Any:
        """The objective S, or ``None`` for the methods that need no gradient (no guard is loaded)."""
        if not self.needs_gradients:
            return None
        if self.objective != "judge":
            return make_objective(self.objective)
        return make_objective("judge", guard_model=self.guard_model, safe_token=self.guard_safe_token,
                              unsafe_token=self.guard_unsafe_token, guard_response_prefix=self.guard_response_prefix,
                              temperature=self.gumbel_temperature, max_new_tokens=self.judge_max_new_tokens,
                              seed=self.seed, trust_remote_code=trust_remote_code)



@dataclass
class RankReduction:
    """How a distributed run combines what each rank accumulated.

    Attributes:
        sum: the sum over ranks of a per-rank number (the examples each rank counted).
        averaged_over: the ranks the strategy already averaged the gradients over (DDP's
            all-reduce and FSDP2's reduce-scatter take the mean), undone before dividing by the
            global count; 1 when each rank's gradients are its own.
    """

    sum: Callable[[float], float]
    averaged_over: int = 1


class WeightSelector:
    """The selection pipeline on one model: set up in ``__init__``, :meth:`accumulate` per batch,
    :meth:`select` once (see the module docstring). :meth:`close` (or leaving the ``with`` block)
    restores the ``requires_grad`` flags and the train/eval mode and frees the buffers, also after
    a failure.

    Args:
        model: the model to score.
        config: the selection.
        objective: the objective S; default ``config.make_objective()``. Objects with ``bind``
            (the judge objective) are bound to ``tokenizer``.
        tokenizer: the scored model's tokenizer (the judge objective needs it).
    """

    def __init__(self, model: torch.nn.Module, config: SelectionConfig, *, objective: Any = None,
                 tokenizer: Any = None) -> None:
        self.model, self.config = model, config
        config.check_size(model)  # k against the scored weights: before any setup or gradient pass
        self.params = config.parameter_filter().select(model)
        self.objective = objective if objective is not None else config.make_objective()
        if config.needs_gradients and self.objective is None:
            raise ValueError(f"selection method {config.method!r} needs an objective")
        if hasattr(self.objective, "bind"):
            if tokenizer is None:
                raise ValueError("the judge objective needs the scored model's tokenizer")
            self.objective.bind(tokenizer)
        self.total = 0.0  # the examples over all ranks (set by scores())
        self.examples = 0.0  # this rank's (padding copies carry weight 0 and do not count)
        self._flags = {name: p.requires_grad for name, p in model.named_parameters()}
        self._was_training = model.training
        require_grad_only(model, self.params)
        clear_safety_gradients(self.params)
        model.eval()  # the gradient of the deployed model: no dropout
        self._float32 = Float32Gradients(self.params) if config.needs_gradients else None

    def accumulate(self, batch: dict[str, Any], *, backward: Callable[[torch.Tensor], None] | None = None,
                   ) -> tuple[torch.Tensor, float]:
        """Add dS/dw of this batch's summed objective (summed now, divided once by the global count
        in :meth:`select`: fewer roundings). ``backward`` runs the backward pass (Lightning's
        ``manual_backward`` under a strategy; default ``loss.backward()``). Returns the batch's
        weighted objective values (detached) and the examples it counts as."""
        if not self.config.needs_gradients:
            raise ValueError(f"selection method {self.config.method!r} takes no gradient; call select() directly")
        values, count = weighted_values(self.objective(self.model, batch), batch)
        loss = values.sum()
        if backward is None:
            loss.backward()
        else:
            backward(loss)
        self._float32.flush()  # after DDP's all-reduce / FSDP2's reduce-scatter
        self.examples += float(count)
        return values.detach(), float(count)

    def scores(self, *, reduce: RankReduction | None = None) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """Finish the gradients (count the examples over ranks with ``reduce``, None: this process
        alone; make them dS/dw of the mean objective) and score every weight
        (:func:`~lit_safety.esi.scoring.method_scores`: the scores, and each tensor's flat offset in
        its parameter, 0 unless sharded). ESI scores are computed in place in the gradient buffers."""
        config = self.config
        self.total = self.examples
        if config.needs_gradients:
            self._release_float32()
            if reduce is not None:
                self.total = float(reduce.sum(self.examples))
            if self.total <= 0:
                raise ValueError("ESI saw no examples: the harmful-prompt data set is empty")
            # undo the strategy's average over ranks, then divide by the global count
            scale_safety_gradients_(self.params, multiply=float(reduce.averaged_over if reduce else 1),
                                    divide=self.total)
        return method_scores(config.method, self.params, seed=config.seed)

    def select(self, *, reduce: RankReduction | None = None, metadata: dict[str, Any] | None = None) -> SafetyMask:
        """:meth:`scores`, then their exact top-k as a mask (every rank returns the same full mask);
        the gradient buffers are released."""
        config = self.config
        scores, offsets = self.scores(reduce=reduce)
        meta = {"method": config.method, "objective": getattr(self.objective, "name", config.objective),
                "seed": config.seed, "model": getattr(getattr(self.model, "config", None), "_name_or_path", ""),
                "num_examples": int(round(self.total)), **(metadata or {})}
        select_on = reverse_order(scores) if config.method == "bottom" else _selectable(scores)
        ratio, k = config.top_k
        if any(is_dtensor(p) for p in self.params.values()):
            mask = _gathered_mask(self.params, scores, select_on, offsets, ratio=ratio, k=k, scope=config.scope,
                                  metadata=meta)
        else:
            mask = mask_from_scores(select_on, ratio=ratio, k=k, scope=config.scope, metadata=meta,
                                    report_scores=scores)
        clear_safety_gradients(self.params)
        return mask

    def _release_float32(self) -> None:
        if self._float32 is not None:
            self._float32.remove()
            self._float32 = None

    def close(self) -> None:
        self._release_float32()
        clear_safety_gradients(self.params)
        for name, p in self.model.named_parameters():
            p.requires_grad_(self._flags[name])
        self.model.train(self._was_training)

    def __enter__(self) -> WeightSelector:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def require_grad_only(model: torch.nn.Module, params: dict[str, torch.nn.Parameter]) -> None:
    """Make exactly ``params`` (the scored weights) require grad, so that no other weight ever gets a
    gradient buffer. Also for the methods that take no gradient: a strategy that wraps the model
    (DDP) needs at least one parameter that requires grad."""
    scored = {id(p) for p in params.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in scored)


def select_weights(model: torch.nn.Module, batches: Iterable[dict[str, Any]] | None, config: SelectionConfig, *,
                   reduce: RankReduction | None = None, objective: Any = None, tokenizer: Any = None,
                   metadata: dict[str, Any] | None = None, progress: bool = False) -> SafetyMask:
    """Run the whole pipeline: accumulate dS/dw over ``batches`` (dicts with ``input_ids``,
    ``attention_mask``, ``labels`` and optionally ``weight``; unused, may be None, for ``random``
    and ``magnitude``), score, and return the exact top-k as a :class:`SafetyMask`."""
    with WeightSelector(model, config, objective=objective, tokenizer=tokenizer) as selector:
        if config.needs_gradients:
            if batches is None:
                raise ValueError(f"selection method {config.method!r} needs batches of harmful prompts")
            batches = list(batches) if not hasattr(batches, "__len__") else batches
            with progress_bar(len(batches), "ESI gradients", progress=progress, unit="batch") as bar:
                for batch in batches:
                    selector.accumulate(batch)
                    bar.update(1)
        return selector.select(reduce=reduce, metadata=metadata)


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
    ratio = ratio if k is None else None
    result = select_topk(scores, ratio=ratio, k=k, scope=scope)
    values = report_scores if report_scores is not None else scores
    kept_scores = {n: values[n].reshape(-1)[idx].float() for n, idx in result.indices.items()}
    meta = _mask_metadata(result, scope, ratio, k, _share(kept_scores, _score_sum(values)), metadata or {})
    return SafetyMask(indices=dict(result.indices), shapes={n: tuple(s.shape) for n, s in scores.items()},
                      scores=kept_scores, metadata=meta)


def _mask_metadata(result: Any, scope: str, ratio: float | None, k: int | None, share: float | None,
                   extra: dict[str, Any]) -> dict[str, Any]:
    """What a mask records about its selection (then the caller's ``extra``: model, method, data ...)."""
    return {"scope": scope, "ratio": ratio, "k_requested": k, "N": result.n, "k": result.k,
            "threshold": result.threshold, "score_share": share, "library_version": __version__, **extra}


def _score_sum(scores: dict[str, torch.Tensor]) -> float:
    return sum(float(v.double().sum()) for v in scores.values())


def _share(kept_scores: dict[str, torch.Tensor], total: float) -> float | None:
    """Fraction of all the scores (summing to ``total``) held by the selected entries: how
    concentrated the scores are (ESI: the share of the first-order safety sensitivity the top-k covers)."""
    if total <= 0:
        return None
    return _score_sum(kept_scores) / total


def _selectable(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """float64 scores (float64 models) are selected on their float32 rounding: the radix top-k works
    on float32 bit patterns, and rounding keeps the order (values equal in float32 tie-break by position)."""
    return {n: v.float() if v.dtype == torch.float64 else v for n, v in scores.items()}


def _gathered_mask(params: dict[str, torch.nn.Parameter], scores: dict[str, torch.Tensor],
                   select_on: dict[str, torch.Tensor], offsets: dict[str, int], *, ratio: float | None,
                   k: int | None, scope: str, metadata: dict[str, Any]) -> SafetyMask:
    """FSDP2 shards: the exact top-k from the all-reduced histograms over every rank's local scores,
    then every rank's selected entries are gathered so that each returns the same full mask."""
    full_numel = {n: p.numel() for n, p in params.items()}
    result = select_topk(select_on, ratio=ratio, k=k, scope=scope, offsets=offsets, full_numel=full_numel)
    local = {n: (idx.cpu(), scores[n].reshape(-1)[idx - offsets[n]].float().cpu()) for n, idx in result.indices.items()}
    gathered: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, local)
    indices, kept = {}, {}
    for name in params:
        parts = sorted((part[name] for part in gathered if name in part), key=lambda t: int(t[0][0]))
        if parts:
            indices[name] = torch.cat([i for i, _ in parts])
            kept[name] = torch.cat([v for _, v in parts])
    device = next(iter(scores.values())).device
    total = torch.tensor(_score_sum(scores), dtype=torch.float64, device=device)
    dist.all_reduce(total)
    meta = _mask_metadata(result, scope, ratio, k, _share(kept, float(total)),
                          {"world_size": dist.get_world_size(), "sharded": True, **metadata})
    return SafetyMask(indices=indices, shapes={n: tuple(p.shape) for n, p in params.items()}, scores=kept,
                      metadata=meta)
