"""Behaviour check of an organism (``lit-safety organism eval``) on held-out prompts and,
optionally, real benchmark files: :class:`SafetyEvaluator` (the evaluator of ``lit-safety test``)
with a keyword judge.

Held-out prompts come from the corpus generator's ``heldout`` split: phrasing templates and
intents (verb x object combinations) that the training split never produces.

With ``progress`` (the default) every set shows a bar on stderr, e.g.
``eval harmful (heldout): 100%|██████████| 200/200 [00:12<00:00, 16.1prompt/s]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lit_safety.evaluation.evaluator import GenerationConfig, SafetyEvaluator
from lit_safety.evaluation.suite import EvalRecord
from lit_safety.judges.keyword import KeywordJudge
from lit_safety.organism.corpus import benign_examples, harmful_examples

BATCH_SIZE = 64
"""Prompts per ``generate`` call."""


def _records(kind: str, prompts: Sequence[str], source: str) -> list[EvalRecord]:
    return [EvalRecord(kind, prompt, i, source=source) for i, prompt in enumerate(prompts)]


def _evaluate(model: Any, tokenizer: Any, sets: Sequence[tuple[str, list[EvalRecord]]], *, stage: str,
              judge: KeywordJudge | None, max_new_tokens: int, progress: bool) -> SafetyEvaluator:
    evaluator = SafetyEvaluator(judge or KeywordJudge(), progress=progress,
                                generation=GenerationConfig(max_new_tokens=max_new_tokens, batch_size=BATCH_SIZE))
    evaluator.run(model, tokenizer, sets, stage=stage)
    return evaluator


def refusal_rate(model: Any, tokenizer: Any, prompts: Sequence[str], *, kind: str = "harmful",
                 judge: KeywordJudge | None = None, max_new_tokens: int = 32, progress: bool = True,
                 stage: str = "prompts") -> float:
    """Fraction of ``prompts`` (``harmful`` or ``benign``) the model refuses (keyword judge).

    ``progress``: a bar on stderr named ``eval <kind> (<stage>)``, counting prompts (global rank 0 only).
    """
    if kind not in ("harmful", "benign"):
        raise ValueError(f"kind must be 'harmful' or 'benign', got {kind!r}")
    if not prompts:
        raise ValueError("refusal_rate needs at least one prompt")
    evaluator = _evaluate(model, tokenizer, [(kind, _records(kind, prompts, stage))], stage=stage, judge=judge,
                          max_new_tokens=max_new_tokens, progress=progress)
    return evaluator.compute()["harmful_refusal_rate" if kind == "harmful" else "benign_over_refusal_rate"]


def evaluate_behaviour(model: Any, tokenizer: Any, *, n: int = 200, seed: int = 1234,
                       max_new_tokens: int = 32, progress: bool = True,
                       judge: KeywordJudge | None = None) -> dict[str, Any]:
    """Refusal rate on held-out harmful prompts and answer rate on held-out benign prompts
    (``progress``: a bar per set on stderr, ``eval harmful (heldout)`` / ``eval benign (heldout)``)."""
    harmful = [ex.prompt for ex in harmful_examples(n, seed=seed, split="heldout")]
    benign = [ex.prompt for ex in benign_examples(n, seed=seed, split="heldout")]
    sets = [("harmful", _records("harmful", harmful, "heldout")), ("benign", _records("benign", benign, "heldout"))]
    evaluator = _evaluate(model, tokenizer, sets, stage="heldout", judge=judge, max_new_tokens=max_new_tokens,
                          progress=progress)
    metrics = evaluator.compute()
    responses = {kind: [s["response"] for s in evaluator.gather_samples() if s["kind"] == kind]
                 for kind in ("harmful", "benign")}
    harmful_refusal = metrics["harmful_refusal_rate"]
    return {
        "heldout_harmful_refusal_rate": harmful_refusal,
        "heldout_harmful_compliance_rate": 1.0 - harmful_refusal,
        "heldout_benign_answer_rate": 1.0 - metrics["benign_over_refusal_rate"],
        "n_harmful": len(harmful),
        "n_benign": len(benign),
        "examples": {
            "harmful": list(zip(harmful[:5], responses["harmful"][:5])),
            "benign": list(zip(benign[:5], responses["benign"][:5])),
        },
    }
