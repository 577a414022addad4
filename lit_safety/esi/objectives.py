"""Differentiable safety objectives S(theta): higher means safer.

Each objective maps a batch to one value per example; ESI uses the mean over the whole data set,
S = (1/N) sum_i s_i, so its gradient is dS/dw = (1/N) sum_i ds_i/dw (a mean, not a sum: scores
do not grow with the data set size).

- ``refusal``: s_i = mean log-likelihood of a refusal given the harmful prompt (response tokens
  only). Raising it makes the model refuse.
- ``compliance``: s_i = minus the mean log-likelihood of the harmful target ("Sure, here is ...").
  Raising it makes the model less likely to comply.
- ``judge``: see :mod:`lit_safety.esi.judge_objective`; it needs a guard model
  (``make_objective("judge", guard_model="organism-guard")``).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from lit_safety.data.chat import IGNORE_INDEX
from lit_safety.esi.judge_objective import JudgeObjective


class SafetyObjective(Protocol):
    name: str
    #: which response the data module should pair with each prompt: "refusal", "compliance" or None
    target: str | None

    def __call__(self, model: Any, batch: dict[str, Any]) -> torch.Tensor:
        """Per-example safety values, shape [batch], differentiable w.r.t. the model."""


def response_log_likelihood(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Mean log p(response token | prefix) per example, over positions whose label is set."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    logits = out.logits[:, :-1]
    if logits.dtype in (torch.float16, torch.bfloat16):  # log-softmax in fp32; never downcast fp64
        logits = logits.float()
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    if not mask.any(dim=1).all():
        raise ValueError("an example has no response tokens (was the response truncated away? raise max_length)")
    token_logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (token_logp * mask).sum(dim=1) / mask.sum(dim=1)


class RefusalObjective:
    """S = log-likelihood of a refusal to the harmful prompt."""

    name = "refusal"
    target = "refusal"

    def __call__(self, model: Any, batch: dict[str, Any]) -> torch.Tensor:
        return response_log_likelihood(model, batch)


class ComplianceObjective:
    """S = negated log-likelihood of the harmful (compliant) target."""

    name = "compliance"
    target = "compliance"

    def __call__(self, model: Any, batch: dict[str, Any]) -> torch.Tensor:
        return -response_log_likelihood(model, batch)


OBJECTIVES = ("refusal", "compliance", "judge")


JUDGE_NEEDS_GUARD = (
    "objective 'judge' needs a guard model that scores the answers: pass "
    "objective=make_objective('judge', guard_model='organism-guard') (from lit_safety.esi.objectives; "
    "guard_model is a hub id such as 'meta-llama/Llama-Guard-3-1B', a local HF directory, an organism guard "
    "name, or a loaded model together with guard_tokenizer=; the guard's other options such as safe_token= "
    "and guard_response_prefix= go there too), or compute_safety_mask(..., objective='judge', "
    "guard_model='organism-guard')"
)


def make_objective(name: str, **judge_options: Any) -> SafetyObjective:
    """Objective by name; ``judge_options`` go to :class:`JudgeObjective` (``guard_model``, required
    for ``judge``, and the guard's options)."""
    if name in ("refusal", "compliance") and judge_options:
        raise ValueError(f"objective {name!r} takes no options, got {sorted(judge_options)}")
    if name == "refusal":
        return RefusalObjective()
    if name == "compliance":
        return ComplianceObjective()
    if name == "judge":
        if judge_options.get("guard_model") is None:
            raise ValueError(JUDGE_NEEDS_GUARD)
        return JudgeObjective(**judge_options)
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {name!r}")
