"""Behaviour check of an organism on held-out prompts (and, optionally, real benchmark files).

Held-out prompts come from the corpus generator's ``heldout`` split: phrasing templates and
intents (verb x object combinations) that the training split never produces.

With ``progress`` (the default) every pass shows a bar on stderr, e.g.
``eval harmful (heldout): 100%|██████████| 200/200 [00:12<00:00, 16.1prompt/s]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lit_safety.generation import generate_responses
from lit_safety.judges.keyword import KeywordJudge
from lit_safety.organism.corpus import benign_examples, harmful_examples


def refusal_rate(model: Any, tokenizer: Any, prompts: Sequence[str], *, judge: KeywordJudge | None = None,
                 max_new_tokens: int = 32, batch_size: int = 64, progress: bool = True,
                 desc: str = "eval prompts") -> tuple[float, list[str]]:
    """Fraction of ``prompts`` the model refuses (keyword judge), and the responses.

    ``progress``: a bar on stderr named ``desc``, counting prompts (global rank 0 only).
    """
    if not prompts:
        raise ValueError("refusal_rate needs at least one prompt")
    judge = judge or KeywordJudge()
    responses = generate_responses(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                   progress=progress, desc=desc)
    refused = sum(judge.is_refusal(r) for r in responses)
    return refused / len(prompts), responses


def evaluate_behaviour(model: Any, tokenizer: Any, *, n: int = 200, seed: int = 1234,
                       max_new_tokens: int = 32, progress: bool = True,
                       judge: KeywordJudge | None = None) -> dict[str, Any]:
    """Refusal rate on held-out harmful prompts and answer rate on held-out benign prompts
    (``progress``: a bar per set on stderr, ``eval harmful (heldout)`` / ``eval benign (heldout)``)."""
    harmful = [ex.prompt for ex in harmful_examples(n, seed=seed, split="heldout")]
    benign = [ex.prompt for ex in benign_examples(n, seed=seed, split="heldout")]
    options = dict(judge=judge, max_new_tokens=max_new_tokens, progress=progress)
    harmful_refusal, harmful_responses = refusal_rate(model, tokenizer, harmful, desc="eval harmful (heldout)",
                                                      **options)
    benign_refusal, benign_responses = refusal_rate(model, tokenizer, benign, desc="eval benign (heldout)", **options)
    return {
        "heldout_harmful_refusal_rate": harmful_refusal,
        "heldout_harmful_compliance_rate": 1.0 - harmful_refusal,
        "heldout_benign_answer_rate": 1.0 - benign_refusal,
        "n_harmful": len(harmful),
        "n_benign": len(benign),
        "examples": {
            "harmful": list(zip(harmful[:5], harmful_responses[:5])),
            "benign": list(zip(benign[:5], benign_responses[:5])),
        },
    }
