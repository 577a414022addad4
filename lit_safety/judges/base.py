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


def check_pairs(prompts: Sequence[str], responses: Sequence[str]) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"judge_batch got {len(prompts)} prompts but {len(responses)} responses")
