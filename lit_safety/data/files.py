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
import sys
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


DATA_SUFFIXES = (".csv", ".json", ".jsonl", ".txt", ".tsv", ".parquet", ".arrow")
"""File name endings that mark a data source as a local file (never a `datasets` hub id)."""


class Record(dict):
    """One row of a data file: a plain dict of its fields that knows where it came from.

    ``source`` is the file (or hub id) and ``location`` the row's place in it: ``"line N"`` for
    JSONL (its line) and CSV (the line the row ends on, the header being line 1), ``"row i"``
    (from 0) for a JSON list or a hub data set. Reading a field the row lacks with ``row[field]`` is
    a :class:`DataError` naming all three, not a bare ``KeyError`` (records of JSON/JSONL files need
    not share their fields); ``row.get(field)`` and ``field in row`` behave as for any dict.
    """

    __slots__ = ("source", "location")

    def __init__(self, fields: dict[str, Any], source: Any = None, location: str = "") -> None:
        super().__init__(fields)
        self.source, self.location = source, location

    def __missing__(self, field: str) -> Any:
        raise DataError(f"{self.source}: {self.location} has no field {field!r}; its fields are {list(self)}")


def row_location(rows: Sequence[Any], i: int) -> str:
    """Where row ``i`` of ``rows`` is in its file: a :class:`Record`'s ``location`` (``"line N"``),
    else ``"row i"``."""
    row = rows[i]
    return row.location if isinstance(row, Record) and row.location else f"row {i}"


def is_local_path(source: str | Path) -> bool:
    """Whether ``source`` is meant as a local file rather than a `datasets` hub id: a ``Path``, a
    string that exists locally, starts with ``./``, ``../``, ``/`` or ``~``, has more than one
    ``/`` or a backslash, or ends in a data-file suffix (:data:`DATA_SUFFIXES`). Everything else
    (``gsm8k``, ``owner/name``) is a hub id."""
    if isinstance(source, Path):
        return True
    text = str(source)
    return (Path(text).expanduser().exists() or text.startswith((".", "/", "~")) or text.count("/") > 1
            or "\\" in text or text.lower().endswith(DATA_SUFFIXES))


def _not_found(source: str | Path, path: Path) -> DataError:
    """The error for a local data path that does not exist: where it was looked for, and the closest
    name in that directory when there is one (a typo)."""
    resolved = path.resolve()
    message = f"file not found: {source} (resolved {resolved})"
    parent = resolved.parent
    if not parent.is_dir():
        return DataError(f"{message}: the directory {parent} does not exist")
    message += f": {resolved.name} does not exist in {parent}"
    import difflib

    try:
        names = [p.name for p in parent.iterdir()]
    except OSError:
        names = []
    close = difflib.get_close_matches(resolved.name, names, n=1)
    return DataError(f"{message}; did you mean {close[0]}?" if close else message)


def _too_deep() -> str:
    return (f"could not parse: the JSON is nested too deeply to read (deeper than Python's recursion limit, "
            f"{sys.getrecursionlimit()}); a data file is a flat list of records")


def _read_jsonl(path: Path) -> list[Record]:
    rows = []
    with open(path, encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {number}: not valid JSON: {err.msg} (column {err.colno})") from None
            except RecursionError:
                raise DataError(f"{path}: line {number}: {_too_deep()}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {number}: expected a JSON object with named fields, "
                                f"got a {type(row).__name__}")
            rows.append(Record(row, path, f"line {number}"))
    return rows


def _read_csv(path: Path) -> list[Record]:
    rows = []
    # utf-8-sig: Excel saves CSV with a byte-order mark, which would otherwise stick to the first column name
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        try:
            for row in reader:
                rows.append(Record(row, path, f"line {reader.line_num}"))
        except csv.Error as err:
            raise DataError(f"{path}: line {reader.line_num}: could not parse: {err}") from None
    return rows


def read_records(source: str | Path, *, split: str = "train") -> list[dict[str, Any]]:
    """All rows of a local CSV/JSON/JSONL file, or of a `datasets` hub id (``split``), each a
    :class:`Record` (a dict that knows its file and line, and names them when a field is missing).

    A source is a local file when :func:`is_local_path` says so; a local file that does not exist is
    a ``DataError`` at once ("file not found: ..."), never a hub lookup. Files are read as UTF-8,
    with or without a byte-order mark.
    """
    path = Path(source).expanduser()
    if path.exists():
        suffix = path.suffix.lower()
        try:
            if suffix == ".csv":
                rows = _read_csv(path)
            elif suffix == ".jsonl":
                rows = _read_jsonl(path)
            elif suffix == ".json":
                try:
                    rows = json.loads(path.read_text(encoding="utf-8-sig"))
                except RecursionError:
                    raise DataError(f"{path}: {_too_deep()}") from None
                if isinstance(rows, dict):
                    rows = next((v for v in rows.values() if isinstance(v, list)), None)
                if not isinstance(rows, list):
                    raise DataError(f"{path}: expected a JSON list of objects")
                rows = [Record(r, path, f"row {i}") if isinstance(r, dict) else r for i, r in enumerate(rows)]
            else:
                raise DataError(f"{path}: unsupported file type {suffix!r}; use .csv, .json or .jsonl")
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: could not parse: {err}") from err
    elif is_local_path(source):
        raise _not_found(source, path)
    else:
        try:
            import datasets

            rows = [Record(r, source, f"row {i}") if isinstance(r, dict) else r
                    for i, r in enumerate(datasets.load_dataset(str(source), split=split))]
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
    """``field`` if the first row has it, else the first candidate present; DataError otherwise. (A
    later row of a file without the field is a ``DataError`` naming its line when it is read:
    :class:`Record`.)"""
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
    ``source``, the row (its line, for rows read from a file: :func:`row_location`) and the field."""
    prompts = []
    for i, row in enumerate(rows):
        if key not in row:
            raise DataError(f"{source}: {row_location(rows, i)} has no field {key!r}; its fields are {list(row)}")
        try:
            prompts.append(record_prompt(row, key))
        except DataError as err:
            raise DataError(f"{source}: {row_location(rows, i)}: {err}") from None
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
