"""Read prompt/response records from CSV, JSON (a list of objects) and JSONL files, or `datasets` ids.

Field names are configurable; when not given, the first of a list of well-known names present in
the data is used (AdvBench ``goal``, HarmBench ``Behavior``, Alpaca ``instruction`` ...). A missing
file, an empty set or a field that does not exist is a ``DataError`` naming the file and field.

Every data path turns a record into a prompt with :func:`record_prompt` (the field chosen once per
file by :func:`prompt_key`), so training, ESI and evaluation read the same file the same way.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PROMPT_FIELDS = ("prompt", "instruction", "goal", "Behavior", "behavior", "question", "query", "text")
"""Where prompts are looked for, in this order, when no field is named (after chat ``messages``)."""
MESSAGES_FIELD = "messages"
INPUT_FIELD = "input"
"""Alpaca's optional context of an instruction (see :func:`record_prompt`)."""


class DataError(ValueError):
    """Bad input data: the message names the file and the field."""


def read_records(source: str | Path, *, split: str = "train") -> list[dict[str, Any]]:
    """All rows of a local CSV/JSON/JSONL file, or of a `datasets` hub id (``split``)."""
    path = Path(source).expanduser()
    if path.exists():
        suffix = path.suffix.lower()
        try:
            if suffix == ".csv":
                with open(path, newline="", encoding="utf-8") as handle:
                    rows = list(csv.DictReader(handle))
            elif suffix == ".jsonl":
                with open(path, encoding="utf-8") as handle:
                    rows = [json.loads(line) for line in handle if line.strip()]
            elif suffix == ".json":
                rows = json.loads(path.read_text(encoding="utf-8"))
                if isinstance(rows, dict):
                    rows = next((v for v in rows.values() if isinstance(v, list)), None)
                if not isinstance(rows, list):
                    raise DataError(f"{path}: expected a JSON list of objects")
            else:
                raise DataError(f"{path}: unsupported file type {suffix!r}; use .csv, .json or .jsonl")
        except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as err:
            raise DataError(f"{path}: could not parse: {err}") from err
    elif str(source).startswith((".", "/", "~")) or str(source).count("/") > 1:
        raise DataError(f"data file {path} does not exist")
    else:
        try:
            import datasets

            rows = list(datasets.load_dataset(str(source), split=split))
        except Exception as err:  # noqa: BLE001 - any hub/network failure becomes one clear message
            raise DataError(f"could not load data set {source!r} (split {split!r}) from the hub: {err}") from err
    if not rows:
        raise DataError(f"{source}: the data set is empty")
    if not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{source}: every record must be an object with named fields")
    return rows


def check_counts(**counts: int) -> None:
    """A ``ValueError`` naming the first of ``counts`` (``num_samples=...``, ``batch_size=...``) below 1."""
    for name, value in counts.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def pick_field(rows: Sequence[dict[str, Any]], field: str | None, candidates: Sequence[str], source: Any, what: str) -> str:
    """``field`` if every row has it, else the first candidate present; DataError otherwise."""
    columns = list(rows[0].keys())
    if field is not None:
        if field not in rows[0]:
            raise DataError(f"{source}: {what} field {field!r} does not exist; columns are {columns}")
        return field
    for name in candidates:
        if name in rows[0]:
            return name
    raise DataError(f"{source}: no {what} field found (looked for {list(candidates)}); columns are {columns}. Set it explicitly.")


def prompt_key(rows: Sequence[dict[str, Any]], prompt_field: str | None, source: Any,
               fields: Sequence[str] = PROMPT_FIELDS, what: str = "prompt") -> str:
    """The field the prompts of ``rows`` are read from: ``prompt_field`` when given (a ``DataError``
    naming ``source`` and the field when the records do not have it); else ``messages`` for chat
    records; else the first of ``fields`` the records have."""
    if prompt_field is None and MESSAGES_FIELD in rows[0]:
        return MESSAGES_FIELD
    return pick_field(rows, prompt_field, fields, source, what)


def record_prompt(row: dict[str, Any], key: str) -> str:
    """The prompt of one record, read from its field ``key`` (``""`` when it has none). The one rule:

    - ``messages`` (chat records, a list of ``{"role", "content"}`` turns): the user turns, each
      stripped, joined by a blank line; system and assistant turns are not part of the prompt (in
      training data the final assistant turn is the response).
    - any other field (``instruction``, ``prompt``, ``goal``, ``Behavior``, ``question`` ...): its text,
      stripped. When the record also has a non-empty Alpaca ``input``, the prompt is the
      instruction, a blank line, then the input (``"Add\n\n2 and 2"``): the order and separator of
      Alpaca's own template (``### Instruction:\n{instruction}\n\n### Input:\n{input}``), and what
      most readers here did before they shared this function.
    - an empty main field gives ``""`` (an ``input`` alone is no prompt); callers skip such records.
    """
    value = row.get(key)
    if key == MESSAGES_FIELD:
        if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
            raise DataError(f"'{MESSAGES_FIELD}' must be a list of {{'role', 'content'}} turns, got {value!r:.80}")
        turns = (str(m.get("content") or "").strip() for m in value if m.get("role") == "user")
        return "\n\n".join(t for t in turns if t)
    text = str(value or "").strip()
    extra = str(row.get(INPUT_FIELD) or "").strip()
    return f"{text}\n\n{extra}" if text and extra else text


def record_prompts(rows: Sequence[dict[str, Any]], key: str, source: Any) -> list[str]:
    """:func:`record_prompt` of every row (``""`` for a row without a prompt, so the list lines up
    with the rows' other fields); a row without the field ``key`` is a ``DataError`` naming
    ``source``, the row and the field."""
    prompts = []
    for i, row in enumerate(rows):
        if key not in row:
            raise DataError(f"{source}: row {i} has no field {key!r}; its fields are {list(row)}")
        try:
            prompts.append(record_prompt(row, key))
        except DataError as err:
            raise DataError(f"{source}: row {i}: {err}") from None
    return prompts


def read_prompts(source: str | Path, *, prompt_field: str | None = None, limit: int | None = None,
                 split: str = "train") -> list[str]:
    """The non-empty prompts of the first ``limit`` records of a file (:func:`record_prompt`)."""
    rows = read_records(source, split=split)[:limit]
    key = prompt_key(rows, prompt_field, source)
    prompts = [p for p in record_prompts(rows, key, source) if p]
    if not prompts:
        raise DataError(f"{source}: field {key!r} is empty in every row")
    return prompts
