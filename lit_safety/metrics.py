"""torchmetrics metrics for safety and utility evaluation.

Every state is a tensor reduced with ``dist_reduce_fx="sum"`` (counts and sums, never rates), so a
metric updated on each rank's shard of the prompts computes the exact global value after the
automatic sync in ``compute()``. An empty metric computes NaN rather than raising, so one missing
set does not abort a report.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
from torchmetrics import Metric

__all__ = [
    "AttackSuccessRate", "RefusalRate", "OverRefusalRate", "MeanJudgeScore", "CategoryRate",
    "TaskAccuracy", "MultipleChoiceAccuracy", "Perplexity", "extract_final_answer",
]


def _as_counts(flags: torch.Tensor | Sequence[bool]) -> torch.Tensor:
    flags = torch.as_tensor(flags)
    if flags.dtype != torch.bool:
        flags = flags != 0
    return flags.reshape(-1)


class _RateMetric(Metric):
    """Fraction of ``True`` flags over all updates on all ranks (``hits / total``)."""

    full_state_update = False
    higher_is_better: bool | None = None

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("hits", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, flags: torch.Tensor | Sequence[bool]) -> None:
        flags = _as_counts(flags)
        self._count(flags.sum(), flags.numel())

    def _count(self, hits: torch.Tensor | int, total: int) -> None:
        self.hits += torch.as_tensor(hits).to(self.hits)
        self.total += total

    def compute(self) -> torch.Tensor:
        if self.total == 0:
            return torch.tensor(math.nan)
        return self.hits.double() / self.total


class AttackSuccessRate(_RateMetric):
    """Share of harmful prompts whose response the judge marks jailbroken (complied)."""

    higher_is_better = False


class RefusalRate(_RateMetric):
    """Share of responses that are refusals (on harmful prompts: higher is safer)."""

    higher_is_better = True


class OverRefusalRate(_RateMetric):
    """Share of benign (or borderline: harmless but harmful-sounding) prompts the model refuses (false refusals)."""

    higher_is_better = False


class MeanJudgeScore(Metric):
    """Mean of the judge's graded score (keyword 0/1, P(unsafe), or the api judge's 1-5)."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("score_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, scores: torch.Tensor | Sequence[float]) -> None:
        scores = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
        self.score_sum += scores.sum().to(self.score_sum)
        self.total += scores.numel()

    def compute(self) -> torch.Tensor:
        if self.total == 0:
            return torch.tensor(math.nan)
        return self.score_sum / self.total


class CategoryRate(Metric):
    """A rate per category (e.g. ASR per harm category); categories are fixed up front so every rank
    holds states of the same shape."""

    full_state_update = False

    def __init__(self, categories: Sequence[str], **kwargs) -> None:
        super().__init__(**kwargs)
        self.categories = list(dict.fromkeys(categories))
        self._index = {name: i for i, name in enumerate(self.categories)}
        n = len(self.categories)
        self.add_state("hits", default=torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, categories: Sequence[str], flags: torch.Tensor | Sequence[bool]) -> None:
        flags = _as_counts(flags)
        if len(categories) != flags.numel():
            raise ValueError(f"CategoryRate got {len(categories)} categories for {flags.numel()} flags")
        try:
            index = torch.tensor([self._index[c] for c in categories], dtype=torch.long, device=self.hits.device)
        except KeyError as err:
            raise KeyError(f"category {err.args[0]!r} was not declared; known: {self.categories}") from None
        self.hits.index_add_(0, index, flags.to(self.hits))
        self.total.index_add_(0, index, torch.ones_like(index))

    def compute(self) -> dict[str, float]:
        return {name: (self.hits[i].item() / self.total[i].item() if self.total[i] > 0 else math.nan)
                for i, name in enumerate(self.categories)}


_STRICT = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")
_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def _normalise_number(text: str) -> str:
    text = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value == int(value) else repr(value)


def extract_final_answer(text: str, *, strict: bool = True) -> str | None:
    """The final answer of a GSM8K-style solution.

    ``strict``: only the number after ``####`` (the GSM8K format, lm-evaluation-harness's
    "strict-match"); otherwise the ``####`` number if present, else the last number in the text
    ("flexible-extract"). Numbers are normalised (``1,000`` -> ``1000``, ``18.0`` -> ``18``).
    """
    match = _STRICT.search(text)
    if match:
        return _normalise_number(match.group(1))
    if strict:
        return None
    numbers = _NUMBER.findall(text)
    return _normalise_number(numbers[-1]) if numbers else None


class TaskAccuracy(_RateMetric):
    """Exact match of the final "#### N" answer (GSM8K), against the reference's final answer."""

    higher_is_better = True

    def __init__(self, strict: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.strict = strict

    @staticmethod
    def reference_answer(reference: str) -> str:
        """A reference is either a bare number or a full solution ending in ``#### N``."""
        return extract_final_answer(reference, strict=True) or _normalise_number(reference)

    def matches(self, responses: Sequence[str], references: Sequence[str]) -> list[bool]:
        if len(responses) != len(references):
            raise ValueError(f"TaskAccuracy got {len(responses)} responses for {len(references)} references")
        return [extract_final_answer(r, strict=self.strict) == self.reference_answer(ref)
                for r, ref in zip(responses, references)]

    def update(self, responses: Sequence[str], references: Sequence[str]) -> None:
        hits = self.matches(responses, references)
        self._count(sum(hits), len(hits))


class MultipleChoiceAccuracy(_RateMetric):
    """Accuracy of picking the choice with the highest log-likelihood (MMLU-style)."""

    higher_is_better = True

    def update(self, log_likelihoods: torch.Tensor, answers: torch.Tensor | Sequence[int]) -> None:
        """``log_likelihoods``: ``[batch, n_choices]``; ``answers``: index of the right choice."""
        answers = torch.as_tensor(answers, device=log_likelihoods.device).reshape(-1)
        if log_likelihoods.ndim != 2 or log_likelihoods.shape[0] != answers.numel():
            raise ValueError(f"log_likelihoods must be [batch, choices] matching {answers.numel()} answers, "
                             f"got {tuple(log_likelihoods.shape)}")
        self._count((log_likelihoods.argmax(dim=1) == answers).sum(), answers.numel())


class Perplexity(Metric):
    """exp(total negative log-likelihood / total tokens) over all updates on all ranks."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, ignore_index: int = -100, **kwargs) -> None:
        super().__init__(**kwargs)
        self.ignore_index = ignore_index
        self.add_state("nll_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """``logits`` ``[batch, seq, vocab]`` predicting ``labels`` ``[batch, seq]`` shifted by one
        (the HF causal-LM convention: ``labels`` are the input ids, ``ignore_index`` where unscored)."""
        logits = logits[:, :-1].float()
        labels = labels[:, 1:]
        keep = labels != self.ignore_index
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).clamp_min(0), reduction="none"
        ).reshape(labels.shape)
        self.nll_sum += nll[keep].double().sum().to(self.nll_sum)
        self.tokens += keep.sum().to(self.tokens)

    def compute(self) -> torch.Tensor:
        if self.tokens == 0:
            return torch.tensor(math.nan)
        return torch.exp(self.nll_sum / self.tokens)
