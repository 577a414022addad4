"""ESI(w) = |sigma(W) * dS/dw|: gradient accumulation and per-element scores.

Gradients of the scored parameters are accumulated over batches (nothing else gets a gradient:
every other parameter has ``requires_grad=False`` while scoring), and the scores are then computed
*in place* in those accumulated gradients, so ESI costs no memory beyond one gradient per scored
weight. sigma is the standard deviation of the tensor, or of each expert's slice for the 3D stacked
expert tensors of transformers-5 MoE models.

Precision: float32/float64 parameters accumulate in ``param.grad`` as usual. A half-precision
(bfloat16/float16) parameter's per-batch gradient is added into a **float32** buffer and freed
(:class:`Float32Gradients`), and its sigma and scores are float32 too: accumulating and scoring in
bfloat16 (8 significant bits) rounds so coarsely that thousands of scores tie at the top-k
threshold and the tie-break by position, not the gradient, decides part of the mask.
:func:`safety_gradient` is the accumulated dS/dw of a parameter, whichever holds it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lit_safety.models.naming import is_excluded_by_default, parse_param_name
from lit_safety.parallel import is_distributed, is_dtensor, local_shard, row_range


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


HALF_DTYPES = (torch.float16, torch.bfloat16)
_FLOAT32_GRAD = "_lit_safety_grad32"  # attribute of a half-precision parameter: its float32 accumulated dS/dw


def score_dtype(param: torch.Tensor) -> torch.dtype:
    """The dtype ESI accumulates and scores ``param`` in: float32 for half precision, else its own."""
    return torch.float32 if param.dtype in HALF_DTYPES else param.dtype


def parameter_std(param: torch.Tensor, name: str) -> torch.Tensor:
    """sigma(W): a scalar, or one value per expert ([E, 1, 1]) for a 3D stacked expert tensor.

    In :func:`score_dtype`: float32 for half-precision weights (never downcast; fp64 stays fp64).
    """
    data = param.detach()
    work = data.to(score_dtype(data))
    if parse_param_name(name).is_expert_stack and data.dim() == 3:
        return work.reshape(data.shape[0], -1).std(dim=1).reshape(-1, 1, 1)
    return work.std()


def _absorb_half_grad(param: torch.Tensor) -> None:
    """Add a half-precision ``param.grad`` into the parameter's float32 buffer and free it."""
    grad = param.grad
    if grad is None or param.dtype not in HALF_DTYPES:
        return
    with torch.no_grad():
        buffer = getattr(param, _FLOAT32_GRAD, None)
        if buffer is None:
            setattr(param, _FLOAT32_GRAD, grad.to(torch.float32))  # a new tensor (DTensor for DTensor grads)
        else:
            buffer.add_(grad)  # float32 += half: exact up-cast, one float32 rounding
    param.grad = None


def safety_gradient(param: torch.Tensor) -> torch.Tensor | None:
    """The accumulated dS/dw of ``param``: its float32 buffer for half precision (a half gradient
    still in ``param.grad`` is added to it first), else ``param.grad``; ``None`` when there is none."""
    if param.dtype in HALF_DTYPES:
        _absorb_half_grad(param)
        return getattr(param, _FLOAT32_GRAD, None)
    return param.grad


def clear_safety_gradients(params: dict[str, torch.nn.Parameter]) -> None:
    """Release the accumulated gradients (``param.grad`` and the float32 buffers)."""
    for p in params.values():
        p.grad = None
        if hasattr(p, _FLOAT32_GRAD):
            delattr(p, _FLOAT32_GRAD)


def scale_safety_gradients_(params: dict[str, torch.nn.Parameter], *, multiply: float = 1.0,
                            divide: float = 1.0) -> None:
    """Scale the accumulated gradients in place (``* multiply / divide``)."""
    with torch.no_grad():
        for p in params.values():
            grad = safety_gradient(p)
            if grad is None:
                continue
            if multiply != 1.0:
                grad.mul_(multiply)
            if divide != 1.0:
                grad.div_(divide)


class Float32Gradients:
    """Accumulate the gradients of the half-precision ``params`` in float32.

    After each backward, every half-precision parameter's gradient is added into a float32 buffer
    (:func:`safety_gradient` returns it) and ``param.grad`` is freed, so rounding to half precision
    happens once per batch gradient, never on the running sum. With ``hooks`` this happens in a
    post-accumulate-grad hook as soon as a gradient is ready (at most one half gradient alive at a
    time); call :meth:`flush` after each backward anyway: it moves whatever the hooks did not see.
    Hooks are off (``hooks=None`` decides) under torch.distributed and for DTensor parameters, where
    DDP all-reduces / FSDP2 reduce-scatters gradients after autograd has accumulated them: there
    :meth:`flush` after the backward moves the reduced gradient. float32/float64 parameters keep
    accumulating in ``param.grad`` (no copy). Use as a context manager, or call :meth:`remove`.
    """

    def __init__(self, params: dict[str, torch.nn.Parameter], *, hooks: bool | None = None) -> None:
        self.half = [p for p in params.values() if p.dtype in HALF_DTYPES]
        if hooks is None:
            hooks = not is_distributed() and not any(is_dtensor(p) for p in self.half)
        self.handles = [p.register_post_accumulate_grad_hook(_absorb_half_grad) for p in self.half
                        if hooks and p.requires_grad]

    def flush(self) -> None:
        for p in self.half:
            _absorb_half_grad(p)

    def remove(self) -> None:
        self.flush()
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def __enter__(self) -> Float32Gradients:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def weighted_values(values: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | float]:
    """(values times the batch's per-example ``"weight"``, the examples they count as).

    Padding examples that make ranks' shards equal carry weight 0 (:class:`HarmfulPromptsDataModule`
    under DDP/FSDP2), so they add nothing to S nor to the count. Without weights: (values, batch size).
    """
    weight = batch.get("weight") if isinstance(batch, dict) else None
    if weight is None:
        return values, float(values.shape[0])
    weight = torch.as_tensor(weight, device=values.device)
    if weight.shape != values.shape[:1]:
        raise ValueError(f"batch 'weight' has shape {tuple(weight.shape)}, expected ({values.shape[0]},)")
    return values * weight.to(values.dtype), weight.sum()


def method_scores(method: str, params: dict[str, torch.nn.Parameter], *, seed: int = 0,
                  ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Per-element scores of a selection ``method`` for every parameter, and the flat offset of
    each score tensor in its full parameter.

    ``esi``/``bottom`` |sigma(W) * dS/dw|, computed *in place* in the accumulated gradients
    (:func:`safety_gradient`; no memory beyond them); ``grad`` |dS/dw|; ``snip`` |W * dS/dw|;
    ``magnitude`` |W|; ``random`` i.i.d. uniform scores (top-k of them is a uniformly random
    k-subset, reproducible from ``seed``). A parameter the objective never reached (e.g. an expert
    no prompt was routed to) is scored 0 rather than dropped. Scores are float32 for
    half-precision parameters.

    For FSDP2 DTensor parameters the scores are this rank's slice (offset: where it starts) of
    exactly the scores the unsharded model gets: sigma(W) comes from the gathered full tensor (one
    at a time) and random scores are drawn for the full shape and sliced likewise. A plain tensor
    is its own slice (offset 0).
    """
    generator = torch.Generator().manual_seed(seed) if method == "random" else None
    scores, offsets = {}, {}
    for name, p in params.items():
        local, offset, _ = local_shard(p.detach())
        offsets[name] = offset
        if method == "random":
            full = torch.rand(p.shape, generator=generator)
            if is_dtensor(p):
                full = full.reshape(-1)[offset:offset + local.numel()].reshape(local.shape)
            scores[name] = full.to(local.device)
            continue
        if method == "magnitude":
            scores[name] = local.float().abs()
            continue
        grad = safety_gradient(p)  # float32 for half-precision parameters
        local_grad = local_shard(grad)[0] if grad is not None else torch.zeros(local.shape, dtype=score_dtype(p),
                                                                              device=local.device)
        with torch.no_grad():
            if method in ("esi", "bottom"):
                std = parameter_std(p.detach().full_tensor() if is_dtensor(p) else p.detach(), name)
                if std.dim() == 3 and is_dtensor(p):  # one sigma per expert: keep this shard's experts (rows)
                    first, rows = row_range(p)
                    std = std[first:first + rows]
                scores[name] = local_grad.mul_(std).abs_()
            elif method == "grad":
                scores[name] = local_grad.float().abs()
            elif method == "snip":
                scores[name] = (local_grad.float() * local.float()).abs()
            else:
                raise ValueError(f"unknown selection method {method!r}")
    return scores, offsets


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
