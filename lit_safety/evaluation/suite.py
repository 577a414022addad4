"""The evaluation suite: which prompts an evaluation runs, loaded and checked before any generation.

:class:`SuiteConfig` holds the options (sources, fields, limits; one typed dataclass shared by
``SafetyEvalDataModule``, ``SafetyEvalCallback`` and scripts); :meth:`SuiteConfig.load` (or
:func:`load_suite`) reads them into an :class:`EvalSuite` of :class:`EvalRecord` lists, and
:func:`shard_records` gives each rank its share.

Six kinds of records:

- ``harmful``: harmful requests asked directly (AdvBench, HarmBench, any CSV/JSON/JSONL/`datasets`
  id with a prompt column); attack success rate, refusal rate, per-category ASR.
- ``jailbreak``: the same harmful requests wrapped in jailbreak templates (a ``{prompt}``
  placeholder) to measure robustness rather than direct refusal.
- ``benign``: harmless instructions; over-refusal rate.
- ``borderline``: benign prompts that only sound harmful ("How do I kill a frozen program?"; the
  shipped set, :data:`BORDERLINE_PATH`, is in the spirit of XSTest's safe prompts); over-refusal
  rate, overall and per category.
- ``task``: GSM8K-style problems with a "#### N" reference; task accuracy and reference perplexity.
- ``mc``: multiple choice (MMLU CSV: question, choice0..choice3, answer); log-likelihood accuracy.

``"organism"`` as a source means the embedded organisms' held-out test prompts (templates and
intents their training never saw); ``"organism-validation"`` prompts from the same distribution
that are never test prompts (choose settings on these); ``None`` skips the set.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lit_safety.data.files import PROMPT_FIELDS, DataError, pick_field, prompt_key, read_records, record_prompts
from lit_safety.parallel import pad_shard_indices
from lit_safety.registry import builtin_corpus

ORGANISM = "organism"
ORGANISM_VALIDATION = "organism-validation"
ORGANISM_SPLITS = {ORGANISM: "heldout", ORGANISM_VALIDATION: "validation"}
BORDERLINE_BUILTIN = "builtin"
"""``borderline_data`` value that means the shipped test set, :data:`BORDERLINE_PATH`."""
BORDERLINE_PATH = Path(__file__).with_name("borderline_prompts.jsonl")
"""The shipped borderline prompts: benign requests that only sound harmful, ``prompt`` + ``category``
(133, for reporting; never trained or tuned on)."""
BORDERLINE_SETS = {BORDERLINE_BUILTIN: BORDERLINE_PATH,
                   "builtin-train": BORDERLINE_PATH.with_name("borderline_prompts_train.jsonl"),
                   "builtin-val": BORDERLINE_PATH.with_name("borderline_prompts_val.jsonl")}
"""Shipped borderline sets by ``borderline_data`` name: ``builtin`` (the test set), and two more sets of
different prompts in the same ten types: ``builtin-train`` (200; e.g. the model's own answers to them as
benign training pairs, so that SET does not learn "refuse what sounds harmful") and ``builtin-val`` (50;
for choosing settings). No prompt is in two sets."""
KINDS = ("harmful", "jailbreak", "benign", "borderline", "task", "mc")
OVER_REFUSAL_KINDS = ("benign", "borderline")
"""Kinds of harmless prompts: every refusal of one is an over-refusal."""
CATEGORIZED_KINDS = ("harmful", "borderline")
"""Kinds whose categories are read from the data (harm categories; borderline prompt types)."""
CATEGORY_FIELDS = ("category", "SemanticCategory", "Category", "type")
ANSWER_FIELDS = ("answer", "output", "target", "response")
TEMPLATE_FIELDS = ("template", "prompt", "text", "jailbreak")


@dataclass(frozen=True)
class EvalRecord:
    kind: str
    prompt: str
    index: int
    """Position within its set (stable across ranks; used to order gathered samples)."""
    category: str | None = None
    reference: str | None = None
    """task: the reference solution or final answer."""
    choices: tuple[str, ...] = ()
    """mc: the answer options."""
    answer_index: int | None = None
    """mc: index of the right option."""
    template: str | None = None
    """jailbreak: the template's name."""
    behavior: str | None = None
    """jailbreak: the harmful request inside the template (what the judge is asked about)."""
    source: str | None = None
    padding: bool = False
    """A repeat that only keeps ranks in step (sharded models); never counted."""


@dataclass
class EvalSuite:
    """All records of an evaluation, by kind, plus the categories seen in the harmful and the
    borderline sets."""

    records: dict[str, list[EvalRecord]] = field(default_factory=dict)

    def categories_of(self, kind: str) -> list[str]:
        """The categories seen in the ``kind`` set, sorted."""
        return sorted({r.category for r in self.records.get(kind, []) if r.category})

    @property
    def categories(self) -> list[str]:
        """Harm categories of the harmful set."""
        return self.categories_of("harmful")

    @property
    def borderline_categories(self) -> list[str]:
        """Prompt types of the borderline set."""
        return self.categories_of("borderline")

    def counts(self) -> dict[str, int]:
        return {kind: len(rs) for kind, rs in self.records.items() if rs}

    def __iter__(self):
        return iter((k, rs) for k, rs in self.records.items() if rs)


def _organism_seed(kind: str, source: str) -> int:
    return builtin_corpus().TEST_SEEDS[kind] if source == ORGANISM else 0


def _limit(rows: list, limit: int | None) -> list:
    return rows if limit is None else rows[:limit]


def load_prompt_set(kind: str, source: str, *, prompt_field: str | None, limit: int | None,
                    category_field: str | None = None, split: str = "train") -> list[EvalRecord]:
    """Harmful, benign or borderline prompts (harmful and borderline ones with categories when the data
    has them)."""
    if source in ORGANISM_SPLITS:
        corpus = builtin_corpus()
        make = corpus.harmful_examples if kind == "harmful" else corpus.benign_examples
        examples = make(limit or 200, seed=_organism_seed(kind, source), split=ORGANISM_SPLITS[source])
        return [EvalRecord(kind, ex.prompt, i, category=ex.category, source=source) for i, ex in enumerate(examples)]
    rows = _limit(read_records(source, split=split), limit)
    column = prompt_key(rows, prompt_field, source, what=f"{kind} prompt")
    cat_column = None
    if kind in CATEGORIZED_KINDS:
        if category_field is not None:
            cat_column = pick_field(rows, category_field, (), source, "category")
        else:
            cat_column = next((c for c in CATEGORY_FIELDS if c in rows[0]), None)
    records = []
    for row, text in zip(rows, record_prompts(rows, column, source)):
        if text:
            category = str(row[cat_column]).strip() if cat_column and row.get(cat_column) else None
            records.append(EvalRecord(kind, text, len(records), category=category, source=str(source)))
    if not records:
        raise DataError(f"{source}: the {kind} prompt field {column!r} is empty in every row")
    return records


def load_task_set(source: str, *, prompt_field: str | None, answer_field: str | None, limit: int | None,
                  split: str = "train") -> list[EvalRecord]:
    """GSM8K-style problems: a question and a reference ending in ``#### N`` (or a bare number)."""
    if source in ORGANISM_SPLITS:
        examples = builtin_corpus().task_examples(limit or 200, seed=_organism_seed("task", source),
                                                  split=ORGANISM_SPLITS[source])
        return [EvalRecord("task", ex.prompt, i, category=ex.category, reference=ex.response, source=source)
                for i, ex in enumerate(examples)]
    rows = _limit(read_records(source, split=split), limit)
    question = pick_field(rows, prompt_field, PROMPT_FIELDS, source, "task question")
    answer = pick_field(rows, answer_field, ANSWER_FIELDS, source, "task answer")
    records = [EvalRecord("task", str(r[question]).strip(), i, reference=str(r[answer]), source=str(source))
               for i, r in enumerate(rows)]
    return records


def _mc_files(source: str) -> list[Path]:
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.csv"))
        # MMLU's layout (<subject>_dev.csv, _val.csv, _test.csv): the test split; dev holds few-shot
        # exemplars and val is for model selection
        files = [f for f in files if f.stem.endswith("_test")] or files
    elif any(ch in source for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(path)))
    else:
        files = [path]
    if not files:
        raise DataError(f"multiple-choice data {source}: no CSV files found")
    return files


def load_mc_set(source: str, *, limit: int | None) -> list[EvalRecord]:
    """MMLU-format CSVs (question, choice0..choiceN, answer as an index or a letter): one file, a
    directory of files (one subject each; where some are named ``*_test.csv``, as in MMLU's
    layout, only those) or a glob; ``limit`` applies per file."""
    records: list[EvalRecord] = []
    for path in _mc_files(source):
        rows = _limit(read_records(path), limit)
        columns = list(rows[0])
        choice_columns = sorted((c for c in columns if c.startswith("choice")), key=lambda c: c[6:])
        if "question" not in columns or len(choice_columns) < 2 or "answer" not in columns:
            raise DataError(f"{path}: multiple-choice data needs question, choice0..choiceN and answer columns; "
                            f"columns are {columns}")
        for row_number, row in enumerate(rows, start=2):
            raw = str(row["answer"]).strip()
            index = ord(raw.upper()) - ord("A") if len(raw) == 1 and raw.isalpha() else None
            if index is None:
                try:
                    index = int(raw)
                except ValueError:
                    raise DataError(f"{path}, row {row_number}: answer {raw!r} is neither an index nor a letter") from None
            if not 0 <= index < len(choice_columns):
                raise DataError(f"{path}, row {row_number}: answer {raw!r} is out of range for "
                                f"{len(choice_columns)} choices")
            records.append(EvalRecord("mc", str(row["question"]).strip(), len(records), category=path.stem,
                                      choices=tuple(str(row[c]) for c in choice_columns), answer_index=index,
                                      source=str(path)))
    return records


def load_jailbreak_templates(source: str, *, limit: int | None = None) -> list[tuple[str, str]]:
    """(name, template) pairs from a .txt file (one template) or a CSV/JSON/JSONL file (a
    ``template`` column, optional ``name``); each template must contain ``{prompt}``."""
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"jailbreak template file {path} does not exist")
    templates: list[tuple[str, str]] | None = None
    if path.suffix.lower() == ".txt":
        templates = [(path.stem, path.read_text(encoding="utf-8"))]
    elif path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: could not parse: {err}") from err
        if isinstance(data, list) and data and all(isinstance(t, str) for t in data):  # a plain list of strings
            templates = [(f"template{i}", t) for i, t in enumerate(data)]
    if templates is None:
        rows = read_records(path)
        column = pick_field(rows, None, TEMPLATE_FIELDS, path, "jailbreak template")
        templates = [(str(r.get("name") or f"template{i}"), str(r[column])) for i, r in enumerate(rows)]
    templates = _limit(templates, limit)
    for name, template in templates:
        if "{prompt}" not in template:
            raise DataError(f"{path}: jailbreak template {name!r} has no '{{prompt}}' placeholder")
    if not templates:
        raise DataError(f"{path}: no jailbreak templates")
    return templates


def wrap_in_templates(harmful: Sequence[EvalRecord], templates: Sequence[tuple[str, str]]) -> list[EvalRecord]:
    """Every harmful prompt inside every template (``str.replace``, so other braces stay literal)."""
    records = []
    for name, template in templates:
        for record in harmful:
            records.append(EvalRecord("jailbreak", template.replace("{prompt}", record.prompt), len(records),
                                      category=record.category, template=name, behavior=record.prompt,
                                      source=record.source))
    return records


@dataclass(frozen=True)
class SuiteConfig:
    """Which prompts an evaluation runs (``lit-safety test``'s data, ``SafetyEvalCallback``'s ``data``).

    A source is a CSV/JSON/JSONL file, a `datasets` hub id, ``organism`` (the embedded organisms'
    held-out test prompts), ``organism-validation`` (prompts from the same distribution that are
    never test prompts) or null (skip the set). Checked on construction; :meth:`load` reads and
    validates every file.
    """

    harmful_data: str | None = ORGANISM
    """Harmful requests (AdvBench ``goal``, HarmBench ``Behavior``, or ``prompt_field``)."""
    benign_data: str | None = ORGANISM
    """Harmless instructions for the over-refusal rate."""
    borderline_data: str | None = None
    """Benign prompts that only sound harmful ("How do I kill a frozen program?"), for the borderline
    over-refusal rate, overall and per ``category``: ``builtin`` (the shipped test set,
    ``lit_safety/evaluation/borderline_prompts.jsonl``: homonyms, figurative language, safe targets ...),
    ``builtin-train`` / ``builtin-val`` (shipped sets of other prompts for training and choosing settings),
    or a CSV/JSON/JSONL file / `datasets` id with a prompt column (and optional ``category``)."""
    task_data: str | None = ORGANISM
    """GSM8K-style JSONL (``question`` + ``answer`` ending in "#### N")."""
    mc_data: str | None = None
    """MMLU-format CSV, a directory of them, or a glob (question, choice0..3, answer)."""
    jailbreak_templates: str | None = None
    """File of templates with a ``{prompt}`` placeholder (.txt = one template; JSON list of strings;
    CSV/JSON/JSONL with a ``template`` column and optional ``name``); every harmful prompt is also
    asked inside every template."""
    prompt_field: str | None = None
    """Column of the harmful prompts (default: the first of prompt, instruction, goal, Behavior,
    question ...)."""
    benign_prompt_field: str | None = None
    """Column of the benign prompts."""
    category_field: str | None = None
    """Column of the harm category (default: category / SemanticCategory if present)."""
    task_prompt_field: str | None = None
    """Column of the task questions."""
    task_answer_field: str | None = None
    """Column of the task reference answers."""
    num_harmful: int | None = 200
    """At most this many harmful prompts (null: all)."""
    num_benign: int | None = 200
    """At most this many benign prompts (null: all)."""
    num_borderline: int | None = 200
    """At most this many borderline prompts (null: all)."""
    num_task: int | None = 200
    """At most this many task problems (null: all)."""
    num_mc: int | None = None
    """At most this many multiple-choice questions per file (null: all)."""
    num_templates: int | None = None
    """At most this many jailbreak templates (null: all)."""
    split: str = "train"
    """Split of `datasets` hub ids."""

    def __post_init__(self) -> None:
        for name in ("num_harmful", "num_benign", "num_borderline", "num_task", "num_mc", "num_templates"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or null (all), got {value}")
        if self.jailbreak_templates and not self.harmful_data:
            raise ValueError("jailbreak_templates wraps the harmful prompts: set harmful_data too")
        if self.borderline_data in ORGANISM_SPLITS:
            raise ValueError(f"borderline_data: the organisms have no borderline prompts; use "
                             f"{BORDERLINE_BUILTIN!r} or a file, got {self.borderline_data!r}")
        if not (self.harmful_data or self.benign_data or self.borderline_data or self.task_data or self.mc_data):
            raise ValueError("the evaluation has no data: set at least one of harmful_data, benign_data, "
                             "borderline_data, task_data, mc_data")

    def load(self) -> EvalSuite:
        """Load and validate every set (a bad file fails here, before any model is loaded)."""
        suite = EvalSuite()
        if self.harmful_data:
            suite.records["harmful"] = load_prompt_set("harmful", self.harmful_data, prompt_field=self.prompt_field,
                                                       limit=self.num_harmful, category_field=self.category_field,
                                                       split=self.split)
        if self.jailbreak_templates:
            templates = load_jailbreak_templates(self.jailbreak_templates, limit=self.num_templates)
            suite.records["jailbreak"] = wrap_in_templates(suite.records["harmful"], templates)
        if self.benign_data:
            suite.records["benign"] = load_prompt_set("benign", self.benign_data, prompt_field=self.benign_prompt_field,
                                                      limit=self.num_benign, split=self.split)
        if self.borderline_data:
            source = str(BORDERLINE_SETS.get(self.borderline_data, self.borderline_data))
            suite.records["borderline"] = load_prompt_set("borderline", source, prompt_field=None,
                                                          limit=self.num_borderline, split=self.split)
        if self.task_data:
            suite.records["task"] = load_task_set(self.task_data, prompt_field=self.task_prompt_field,
                                                  answer_field=self.task_answer_field, limit=self.num_task,
                                                  split=self.split)
        if self.mc_data:
            suite.records["mc"] = load_mc_set(self.mc_data, limit=self.num_mc)
        return suite


def load_suite(config: SuiteConfig | None = None, **options: Any) -> EvalSuite:
    """Load and validate every set of ``config`` (default: :class:`SuiteConfig`'s defaults) with
    ``options`` (fields of :class:`SuiteConfig`) replaced: ``load_suite(num_harmful=10)``."""
    config = config or SuiteConfig()
    return (replace(config, **options) if options else config).load()


def shard_records(records: Sequence[EvalRecord], rank: int, world_size: int) -> list[EvalRecord]:
    """This rank's share (``records[rank::world_size]``), padded with repeats marked ``padding`` so
    that every rank runs the same number of batches: a sharded (FSDP) model all-gathers weights in
    every forward, so ranks must stay in step."""
    return [replace(records[i], padding=True) if padding else records[i]
            for i, padding in pad_shard_indices(len(records), rank, world_size)]

