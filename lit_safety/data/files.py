"""Read prompt/response records from CSV, JSON (a list of objects) and JSONL files, or `datasets` ids.

Field names are configurable; when not given, the first of a list of well-known names present in
the data is used (AdvBench ``goal``, HarmBench ``Behavior``, Alpaca ``instruction`` ...). A missing
file, an empty set or a field that does not exist is a ``DataError`` naming the file and field.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PROMPT_FIELDS = ("prompt", "instruction", "goal", "Behavior", "behavior", "question", "query", "text")


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


def read_prompts(source: str | Path, *, prompt_field: str | None = None, input_field: str | None = "input",
                 limit: int | None = None, split: str = "train") -> list[str]:
    """Prompts from a file; an Alpaca-style ``input`` is appended to its instruction when present."""
    rows = read_records(source, split=split)
    field = pick_field(rows, prompt_field, PROMPT_FIELDS, source, "prompt")
    prompts = []
    for row in rows[:limit]:
        text = str(row[field] or "").strip()
        extra = str(row.get(input_field) or "").strip() if input_field else ""
        prompts.append(f"{text}\n\n{extra}" if extra else text)
    prompts = [p for p in prompts if p]
    if not prompts:
        raise DataError(f"{source}: field {field!r} is empty in every row")
    return prompts
