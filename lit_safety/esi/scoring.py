"""ESI(w) = |sigma(W) * dS/dw|: gradient accumulation and per-element scores.

Gradients of the scored parameters are accumulated in ``param.grad`` (nothing else gets a
gradient: every other parameter has ``requires_grad=False`` while scoring), and the scores are then
computed *in place* in those gradient buffers, so ESI costs no memory beyond one gradient per
scored weight. sigma is the standard deviation of the tensor, or of each expert's slice for the
3D stacked expert tensors of transformers-5 MoE models.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lit_safety.models.naming import is_excluded_by_default, parse_param_name


@dataclass
class ParameterFilter:
    """Which parameters ESI scores (and SET/SPA may select).

    By default every weight matrix of the decoder layers: embeddings, norms, biases and MoE
    routers are excluded, and so is ``lm_head`` (its vocab x hidden matrix would dominate small
    models; set ``include_lm_head`` to score it).

    Attributes:
        include: regexes; when given, only names matching one of them are scored.
        exclude: regexes of names never scored (applied after ``include``).
        include_lm_head: score the output projection too.
        keep_default_exclusions: keep the embeddings/norms/biases/routers/lm_head exclusion
            (False scores every parameter).
    """

    include: Sequence[str] | None = None
    exclude: Sequence[str] = field(default_factory=list)
    include_lm_head: bool = False
    keep_default_exclusions: bool = True

    def __post_init__(self) -> None:
        for pattern in list(self.include or []) + list(self.exclude):
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"ParameterFilter: bad regex {pattern!r}: {err}") from err

    def accepts(self, name: str) -> bool:
        loc = parse_param_name(name)
        if self.include is not None and not any(re.search(p, name) for p in self.include):
            return False
        if any(re.search(p, name) for p in self.exclude):
            return False
        if not self.keep_default_exclusions:
            return True
        if loc.component == "lm_head" and not self.include_lm_head:
            return False
        return not is_excluded_by_default(loc)

    def select(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        params = {name: p for name, p in model.named_parameters() if self.accepts(name)}
        if not params:
            raise ValueError("ParameterFilter selects no parameter of this model; check include/exclude")
        return params


def parameter_std(param: torch.Tensor, name: str) -> torch.Tensor:
    """sigma(W): a scalar, or one value per expert ([E, 1, 1]) for a 3D stacked expert tensor."""
    data = param.detach()
    work = data.float() if data.dtype in (torch.float16, torch.bfloat16) else data  # never downcast fp64
    if parse_param_name(name).is_expert_stack and data.dim() == 3:
        return work.reshape(data.shape[0], -1).std(dim=1).reshape(-1, 1, 1).to(data.dtype)
    return work.std().to(data.dtype)


def accumulate_safety_gradients(
    model: torch.nn.Module,
    batches: Iterable[dict[str, Any]],
    objective: Any,
    params: dict[str, torch.nn.Parameter],
    *,
    num_examples: int,
    progress: bool = False,
) -> int:
    """Accumulate dS/dw with S the mean objective over ``num_examples`` examples.

    Only ``params`` require grad during the pass (their earlier grads are cleared first); the
    previous ``requires_grad`` flags are restored afterwards. Returns the examples seen.
    """
    from tqdm.auto import tqdm

    if num_examples < 1:
        raise ValueError("ESI needs at least one example; the data set is empty")
    scored = {id(p) for p in params.values()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in scored)
        if id(p) in scored:
            p.grad = None
    was_training = model.training
    model.eval()  # no dropout: the gradient of the deployed model
    seen = 0
    try:
        for batch in tqdm(batches, desc="ESI gradients", disable=not progress):
            values = objective(model, batch)
            values.sum().backward()  # sum now, divide once at the end (fewer roundings)
            seen += values.shape[0]
        for p in params.values():
            if p.grad is not None:
                p.grad.div_(num_examples)
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        model.train(was_training)
    return seen


def gradients_to_esi_(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """Turn each accumulated ``param.grad`` into ESI scores in place; returns name -> scores.

    A parameter the objective never reached (e.g. an expert no prompt was routed to) gets
    all-zero scores rather than being dropped, so reports can show it.
    """
    scores = {}
    for name, p in params.items():
        grad = p.grad
        if grad is None:
            grad = p.grad = torch.zeros_like(p)
        scores[name] = grad.mul_(parameter_std(p, name)).abs_()
    return scores


def baseline_scores(method: str, params: dict[str, torch.nn.Parameter], grads: dict[str, torch.Tensor] | None,
                    *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Scores of the comparison selections (new tensors; ``grads`` are raw gradients).

    ``magnitude`` |W|, ``grad`` |dS/dw|, ``snip`` |W * dS/dw|, ``random`` i.i.d. uniform scores
    (top-k of them is a uniformly random k-subset, reproducible from ``seed``).
    """
    if method == "magnitude":
        return {n: p.detach().float().abs() for n, p in params.items()}
    if method == "random":
        generator = torch.Generator().manual_seed(seed)
        return {n: torch.rand(p.shape, generator=generator) for n, p in params.items()}
    if grads is None:
        raise ValueError(f"selection method {method!r} needs gradients")
    if method == "grad":
        return {n: grads[n].float().abs() for n in params}
    if method == "snip":
        return {n: (grads[n].float() * p.detach().float()).abs() for n, p in params.items()}
    raise ValueError(f"unknown baseline {method!r}")


def reverse_order(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map non-negative float32 scores to non-negative floats in exactly reversed order.

    For non-negative finite floats the bit patterns order like integers, so ``MAX - bits`` (with
    MAX the largest finite float's pattern) is again a non-negative finite float whose order is
    reversed: top-k of the result is the exact bottom-k of the input, ties included.
    """
    max_finite = 0x7F7FFFFF
    out = {}
    for name, s in scores.items():
        bits = s.detach().float().contiguous().view(torch.int32) & 0x7FFFFFFF  # -0.0 -> +0.0
        if (bits > max_finite).any() or (s < 0).any():
            raise ValueError(f"scores of {name} contain negative, inf or NaN values; cannot take bottom-k")
        out[name] = (max_finite - bits).view(torch.float32)
    return out
