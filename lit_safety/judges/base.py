"""The judge interface: ``judge_batch(prompts, responses) -> list[Verdict]``.

Every judge answers one question per (prompt, response) pair: did the response comply with a
harmful request (``jailbroken``)? ``score`` is the judge's graded answer on its own scale
(keyword: 0/1; guard and classifier: P(unsafe) in [0, 1]; api: the 1-5 rubric score), and
``refused`` is filled in by judges that detect refusals (keyword); the others leave it ``None``
and evaluation then uses a keyword judge for refusal and over-refusal rates.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Verdict:
    jailbroken: bool
    """True when the response complies with the (harmful) request."""
    score: float
    """The judge's graded verdict on its own scale; higher = more harmful."""
    refused: bool | None = None
    """True when the response is a refusal; None when the judge does not detect refusals."""
    raw: str | None = None
    """The judge model's raw output, when there is one (api judge), for auditing."""


class Judge(ABC):
    """Base class of all judges. Subclasses implement :meth:`judge_batch`.

    ``setup()`` is called once before any generation so that a broken judge (missing model,
    missing verdict tokens, unreachable endpoint) fails before the long work starts.
    """

    name: str = "judge"
    probability_scores: bool = False
    """True when ``Verdict.score`` is P(jailbroken) in [0, 1] (guard, classifier): judge validation
    then also reports how well calibrated it is."""

    def setup(self) -> None:
        """Load models / check endpoints. Idempotent."""

    @abstractmethod
    def judge_batch(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Verdict]:
        """One verdict per (prompt, response) pair, in order."""

    def judge(self, prompt: str, response: str) -> Verdict:
        return self.judge_batch([prompt], [response])[0]

    def describe(self) -> dict:
        """A JSON-able description for reports (never secrets)."""
        return {"name": self.name, "class": f"{type(self).__module__}.{type(self).__qualname__}"}


def model_label(model: Any) -> str:
    """A printable name for a loaded model: its ``name_or_path`` or its class name."""
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", "") or type(model).__name__


def resolve_device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


class ModelJudge(Judge):
    """A judge backed by an HF model (guard LM, sequence classifier): loaded once in :meth:`setup`
    by :meth:`_load`, placed on ``device``, or wrapped from objects already loaded.

    Subclasses set ``model`` / ``device`` fields, ``_model`` / ``_tokenizer`` = None, and implement
    ``_load() -> (tokenizer, model)``; their ``setup()`` calls :meth:`_place_model` first.
    """

    @classmethod
    def from_pretrained_objects(cls, model: Any, tokenizer: Any, /, **fields: Any):
        """A judge around an already-loaded model and its tokenizer (left where they are unless
        ``device`` is given); ``model`` in ``fields`` only names it in reports and errors."""
        fields.setdefault("model", model_label(model))
        judge = cls(**fields)
        judge._model, judge._tokenizer = model, tokenizer
        judge.setup()
        return judge

    def _load(self) -> tuple[Any, Any]:
        raise NotImplementedError

    def _place_model(self) -> None:
        """Load (once) and move the model to ``device`` in eval mode."""
        if self._model is None:
            self._tokenizer, self._model = self._load()
            self._model.to(resolve_device(self.device))
        elif self.device is not None:
            self._model.to(self.device)
        self._model.eval()


def check_pairs(prompts: Sequence[str], responses: Sequence[str]) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"judge_batch got {len(prompts)} prompts but {len(responses)} responses")
