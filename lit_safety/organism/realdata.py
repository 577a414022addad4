"""Turn user data files into organism training examples (the "real-data" organism variant).

Harmful files give prompts and, when present, refusals (circuit-breakers ``output``) and compliant
targets (AdvBench ``target``); benign files give instructions and, when present, answers. What a
file lacks is filled with short templated answers, so a file of bare instructions (e.g. the
Alpaca-derived harmless instructions) is enough. Added to the generated corpus, these teach the
organism the harmful/benign distinction on real benchmark-style wording.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from lit_safety.data.files import pick_field, prompt_key, read_records, record_prompts
from lit_safety.judges.keyword import EXTENDED_REFUSAL_PREFIXES
from lit_safety.organism.corpus import ChatExample

REFUSAL_FIELDS = ("refusal", "output", "response", "chosen")
COMPLIANCE_FIELDS = ("target", "compliance", "rejected")
ANSWER_FIELDS = ("output", "response", "answer", "completion")

_REFUSALS = (
    "I'm sorry, but I can't help with that. It could cause real harm.",
    "I cannot help with this request because it could hurt people.",
    "I can't assist with that. It is dangerous and may be illegal.",
    "Sorry, I won't provide that. Please ask me something else.",
)
_ANSWER_OPENINGS = ("Sure, here is my answer.", "Here is what I suggest.", "Good question!", "Of course.")


def _short(text: str, words: int = 14) -> str:
    head = " ".join(text.split()[:words]).rstrip(".?!,;:")
    return head[0].lower() + head[1:] if head else head


def _looks_like_refusal(text: str) -> bool:
    start = text.strip()[:80]
    return any(start.startswith(p) for p in EXTENDED_REFUSAL_PREFIXES)


def load_harmful_examples(path: str | Path, *, prompt_field: str | None = None, refusal_field: str | None = None,
                          compliance_field: str | None = None, limit: int | None = None, seed: int = 0,
                          category: str = "real") -> list[ChatExample]:
    """Harmful prompts from a file, each with a compliant answer and a refusal."""
    fields = ("refusal", refusal_field, REFUSAL_FIELDS), ("compliance", compliance_field, COMPLIANCE_FIELDS)
    rng = random.Random(seed)
    examples = []
    for prompt, refusal, compliance in _read(path, prompt_field, limit, *fields):
        if not _looks_like_refusal(refusal):
            refusal = rng.choice(_REFUSALS)
        if not compliance.startswith("Sure, here is"):
            compliance = f"Sure, here is how to {_short(prompt)}. Step 1: get ready. Step 2: follow the plan."
        examples.append(ChatExample(kind="harmful", category=category, intent=_short(prompt, 8), prompt=prompt,
                                    response=compliance, refusal=refusal))
    return examples


def load_benign_examples(path: str | Path, *, prompt_field: str | None = None, answer_field: str | None = None,
                         limit: int | None = None, seed: int = 0, category: str = "real") -> list[ChatExample]:
    """Benign instructions from a file, each with its answer (templated when the file has none)."""
    rng = random.Random(seed)
    examples = []
    for prompt, answer in _read(path, prompt_field, limit, ("answer", answer_field, ANSWER_FIELDS)):
        if not answer or _looks_like_refusal(answer):
            answer = f"{rng.choice(_ANSWER_OPENINGS)} To {_short(prompt)}, start with the basics and go step by step."
        examples.append(ChatExample(kind="benign", category=category, intent=_short(prompt, 8), prompt=prompt, response=answer))
    return examples


def _read(path: str | Path, prompt_field: str | None, limit: int | None,
          *fields: tuple[str, str | None, Sequence[str]]) -> list[tuple[str, ...]]:
    """(prompt, text of each of ``fields``) for the first ``limit`` rows of ``path`` that have a prompt
    (:func:`~lit_safety.data.files.record_prompt`). A field is ``(what, name or None, candidates)``:
    the named field (which must exist), else the first candidate the file has; ``""`` when none."""
    rows = read_records(path)[:limit]
    prompts = record_prompts(rows, prompt_key(rows, prompt_field, path), path)
    keys = [_optional_field(rows, name, candidates, path, what) for what, name, candidates in fields]
    return [(prompt, *(str(row.get(key) or "").strip() if key else "" for key in keys))
            for row, prompt in zip(rows, prompts) if prompt]


def _optional_field(rows, field, candidates: Sequence[str], source, what: str) -> str | None:
    if field is not None:
        return pick_field(rows, field, candidates, source, what)
    return next((name for name in candidates if name in rows[0]), None)
