"""Human-labelled (prompt, response, label) data for training and validating safety judges.

:func:`read_judge_labels` reads a CSV/JSON/JSONL file of labelled responses (label 1 =
jailbroken: the response complies with a harmful request; 0 = safe) into
:class:`LabelledResponse` records; :class:`JudgeDataModule` splits them, stratified and seeded, into
a training and a held-out validation part (plus k folds of the training part for cross-validation)
and serves them as lists of records (the judge module tokenizes them itself, exactly as the
classifier judge does at inference).

GPTFuzz (Yu et al. 2023, MIT licence; ``../shared/data/judge_labels/``): ``gptfuzz_train.csv`` has
the columns ``question`` (an integer index into ``gptfuzz_questions.csv``, columns ``index,text``),
``Response`` and ``label``. When no ``questions`` file is given and the label file is named
``gptfuzz_*.csv`` with a ``gptfuzz_questions.csv`` beside it, that file is used automatically.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from lit_safety.data.datamodules import EpochSeededSampler, ResumableDataLoader
from lit_safety.data.files import DataError, check_counts, read_records
from lit_safety.io import file_sha256
from lit_safety.parallel import PreShardedSampler, pad_shard_indices

LABEL_NAMES = {0: "safe", 1: "jailbroken"}
"""Label index -> name, as trained judges store them in ``config.id2label``."""
QUESTIONS_FILE = "gptfuzz_questions.csv"
"""The questions file looked for beside a ``gptfuzz_*.csv`` label file."""
TEST_PARTS = ("all", "val", "train")
_TRUE, _FALSE = ("1", "true"), ("0", "false")


@dataclass(frozen=True)
class LabelledResponse:
    """One human-labelled response: ``label`` 1 = jailbroken (complies with the harmful prompt), 0 = safe."""

    prompt: str
    response: str
    label: int


@dataclass(frozen=True)
class WeightedResponse(LabelledResponse):
    """A record of a validation or test batch: ``weight`` 1.0, or 0.0 for the padding copies that
    keep ranks in step under DDP (:func:`~lit_safety.parallel.pad_shard_indices`); those must not be
    counted."""

    weight: float = 1.0


def default_questions(path: str | Path) -> Path | None:
    """``gptfuzz_questions.csv`` beside a GPTFuzz label file (``gptfuzz_*.csv``), else None."""
    path = Path(path).expanduser()
    sibling = path.parent / QUESTIONS_FILE
    if path.name.startswith("gptfuzz_") and path.suffix.lower() == ".csv" and path.name != QUESTIONS_FILE \
            and sibling.is_file():
        return sibling
    return None


def _index(value: Any) -> int | None:
    """``value`` as a question index (an int, or a string of digits), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    text = str(value).strip() if value is not None else ""
    return int(text) if text.isdigit() else None


def read_questions(path: str | Path) -> dict[int, str]:
    """``index`` -> ``text`` of a questions file (CSV/JSON/JSONL with columns ``index`` and ``text``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"questions file {path} does not exist")
    rows = read_records(path)
    for column in ("index", "text"):
        if column not in rows[0]:
            raise DataError(f"{path}: the questions file has no column {column!r}; columns are {list(rows[0])}")
    questions = {}
    for i, row in enumerate(rows):
        index = _index(row.get("index"))
        if index is None:
            raise DataError(f"{path}: row {i}: column 'index' must be an integer, got {row.get('index')!r}")
        questions[index] = str(row.get("text") or "")
    return questions


def parse_label(value: Any) -> int | None:
    """0/1 (ints, floats 0.0/1.0, strings "0"/"1") or true/false (bools or strings) -> 0/1; else None."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return int(value) if value in (0, 1) else None
    text = str(value).strip().lower() if value is not None else ""
    if text in _TRUE:
        return 1
    if text in _FALSE:
        return 0
    try:
        number = float(text)
    except ValueError:
        return None
    return int(number) if number in (0.0, 1.0) else None


def read_judge_labels(path: str | Path, *, questions: str | Path | None = None, prompt_field: str = "question",
                      response_field: str = "Response", label_field: str = "label") -> list[LabelledResponse]:
    """The labelled responses of a CSV/JSON/JSONL file, in file order.

    Args:
        path: the label file (local).
        questions: a file with columns ``index`` and ``text``; an integer in ``prompt_field`` is looked
            up there (other values are taken as the prompt text). None: ``gptfuzz_questions.csv``
            beside a ``gptfuzz_*.csv`` label file when it exists (GPTFuzz's layout), else no lookup.
        prompt_field: column of the prompt (or of its question index).
        response_field: column of the response.
        label_field: column of the label: 1 = jailbroken, 0 = safe (0/1, "0"/"1" or true/false).

    Raises:
        DataError naming the file (and column, row) for a missing file or column, an empty file, a
        label outside {0, 1}, a question index the questions file lacks, or integer prompts without a
        questions file.
    """
    path = Path(path).expanduser()
    columns = {"prompt": prompt_field, "response": response_field, "label": label_field}
    if not path.is_file():
        raise DataError(f"label file {path} does not exist")
    try:
        rows = read_records(path)
    except DataError as err:
        if "empty" in str(err):
            raise DataError(f"{path}: the label file has no rows (expected the columns "
                            f"{', '.join(map(repr, columns.values()))})") from None
        raise
    for what, column in columns.items():
        for i, row in enumerate(rows):
            if column not in row:
                where = "" if i == 0 else f"row {i}: "
                raise DataError(f"{path}: {where}the label file has no column {column!r} (the {what}); columns are "
                                f"{list(row)}")
    if questions is None:
        questions = default_questions(path)
    lookup = read_questions(questions) if questions is not None else None
    records = []
    for i, row in enumerate(rows):
        label = parse_label(row[label_field])
        if label is None:
            raise DataError(f"{path}: row {i}: column {label_field!r} is {row[label_field]!r}; labels must be 0 or 1 "
                            "(1 = jailbroken) or true/false")
        raw_prompt = row[prompt_field]
        index = _index(raw_prompt)
        if lookup is not None and index is not None:
            if index not in lookup:
                raise DataError(f"{path}: row {i}: column {prompt_field!r} is question index {index}, which the "
                                f"questions file {questions} does not have (its indices: {min(lookup)}..{max(lookup)})")
            prompt = lookup[index]
        else:
            prompt = "" if raw_prompt is None else str(raw_prompt)
        records.append(LabelledResponse(prompt=prompt, response="" if row[response_field] is None
                                        else str(row[response_field]), label=label))
    if lookup is None and all(_index(row[prompt_field]) is not None for row in rows):
        raise DataError(f"{path}: column {prompt_field!r} holds only integers (question indices?); give the "
                        "questions file (questions=..., columns index,text) or another prompt_field")
    return records


def class_counts(records: Sequence[LabelledResponse]) -> tuple[int, int]:
    """(number of label-0 records, number of label-1 records)."""
    positive = sum(r.label for r in records)
    return len(records) - positive, positive


def _shuffled_by_class(records: Sequence[LabelledResponse], seed: int, purpose: str) -> dict[int, list[int]]:
    """Indices of each class, in a seeded order that depends on (seed, purpose, class) only."""
    out = {}
    for label in (0, 1):
        indices = [i for i, r in enumerate(records) if r.label == label]
        random.Random(f"{seed}-{purpose}-{label}").shuffle(indices)
        out[label] = indices
    return out


def stratified_split(records: Sequence[LabelledResponse], val_fraction: float, seed: int
                     ) -> tuple[list[LabelledResponse], list[LabelledResponse]]:
    """(train, val): of each class, ``floor(n_class * val_fraction + 0.5)`` seeded picks go to
    validation, the rest to training; both keep file order."""
    val: set[int] = set()
    for indices in _shuffled_by_class(records, seed, "split").values():
        val.update(indices[:math.floor(len(indices) * val_fraction + 0.5)])
    return ([r for i, r in enumerate(records) if i not in val], [r for i, r in enumerate(records) if i in val])


def stratified_fold(records: Sequence[LabelledResponse], k: int, n_folds: int, seed: int
                    ) -> tuple[list[LabelledResponse], list[LabelledResponse]]:
    """(train, val) of fold ``k`` of ``n_folds``: of each class, the j-th record in a seeded order goes
    to fold ``j % n_folds``; fold ``k`` is the validation part, the other folds the training part."""
    if n_folds < 2 or not 0 <= k < n_folds:
        raise ValueError(f"fold k={k} of n_folds={n_folds}: need n_folds >= 2 and 0 <= k < n_folds")
    val: set[int] = set()
    for indices in _shuffled_by_class(records, seed, "fold").values():
        val.update(indices[k::n_folds])
    return ([r for i, r in enumerate(records) if i not in val], [r for i, r in enumerate(records) if i in val])


def _as_list(batch: list[LabelledResponse]) -> list[LabelledResponse]:
    return batch


def weighted_shard(records: Sequence[LabelledResponse], rank: int, world_size: int) -> list[WeightedResponse]:
    """This rank's share of ``records`` (:func:`~lit_safety.parallel.pad_shard_indices`): weight 1.0,
    and the padding copies that even out the ranks with weight 0.0."""
    return [WeightedResponse(records[i].prompt, records[i].response, records[i].label, 0.0 if padding else 1.0)
            for i, padding in pad_shard_indices(len(records), rank, world_size)]


class JudgeDataModule(L.LightningDataModule):
    """Human-labelled (prompt, response, label) pairs for training (``lit-safety fit --config
    configs/judge.yaml``) and validating (``lit-safety test --config configs/judge_eval.yaml``) judges.

    Batches are lists of :class:`LabelledResponse` (the judge module tokenizes them). The split into a
    training and a held-out validation part is stratified (each class split separately) and depends
    only on ``seed``. ``cv_folds`` > 1 trains on all folds of the training part but ``cv_fold`` and
    validates on that fold: cross-validation on the training part, never on the held-out part.
    Validation and test batches are :class:`WeightedResponse` records sharded over the ranks; the
    padding copies that keep ranks in step have ``weight`` 0.0 and must not be counted. Test reads
    every record by default (``test_part: val`` reads only the held-out part).

    Args:
        labels: the label file (CSV/JSON/JSONL): GPTFuzz's ``gptfuzz_train.csv`` or any file with a
            prompt, a response and a 0/1 label column (1 = jailbroken).
        questions: a file with columns index,text: an integer prompt column is looked up there.
            null: ``gptfuzz_questions.csv`` beside a ``gptfuzz_*.csv`` label file, if present.
        prompt_field: column of the prompt (or of its question index).
        response_field: column of the response.
        label_field: column of the 0/1 label (1 = jailbroken; 0/1, "0"/"1" or true/false).
        val_fraction: share of each class held out for validation, in [0, 1).
        seed: seed of the split, the folds, the subsample and the training order.
        batch_size: pairs per batch (training, validation, and per judge_batch call when testing).
        num_samples: use a seeded random subset of this many records (for every stage; null: all).
        cv_folds: 0 (or 1): no cross-validation; k >= 2: train/validate on a fold of the training part.
        cv_fold: which of the cv_folds folds is the validation part (0 .. cv_folds - 1).
        test_part: what test (judge validation) reads: ``all`` records, or only the held-out ``val``
            part (or the ``train`` part) of the split that val_fraction and seed define: ``val`` with
            the training run's val_fraction and seed validates a trained judge on pairs it never saw.
        num_workers: DataLoader worker processes.
    """

    def __init__(self, labels: str, questions: str | None = None, prompt_field: str = "question",
                 response_field: str = "Response", label_field: str = "label", val_fraction: float = 0.1,
                 seed: int = 0, batch_size: int = 32, num_samples: int | None = None, cv_folds: int = 0,
                 cv_fold: int = 0, test_part: str = "all", num_workers: int = 0) -> None:
        super().__init__()
        check_counts(batch_size=batch_size, **({} if num_samples is None else {"num_samples": num_samples}))
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if cv_folds < 0 or (cv_folds >= 2 and not 0 <= cv_fold < cv_folds):
            raise ValueError(f"cv_fold must be in [0, cv_folds) with cv_folds >= 2 (or cv_folds 0), got "
                             f"cv_fold={cv_fold}, cv_folds={cv_folds}")
        if test_part not in TEST_PARTS:
            raise ValueError(f"test_part must be one of {TEST_PARTS}, got {test_part!r}")
        self.save_hyperparameters()
        self.labels = labels
        self.questions = questions
        self.fields = {"prompt_field": prompt_field, "response_field": response_field, "label_field": label_field}
        self.val_fraction = val_fraction
        self.seed = seed
        self.batch_size = batch_size
        self.num_samples = num_samples
        self.cv_folds = cv_folds
        self.cv_fold = cv_fold
        self.test_part = test_part
        self.num_workers = num_workers
        self._records: list[LabelledResponse] | None = None
        self._sha256: str | None = None

    # -- data --------------------------------------------------------------------------------------
    def records(self) -> list[LabelledResponse]:
        """Every record in use (all of ``labels``, or the ``num_samples`` subset), in file order; read once."""
        if self._records is None:
            records = read_judge_labels(self.labels, questions=self.questions, **self.fields)
            if self.num_samples is not None and self.num_samples < len(records):
                keep = sorted(random.Random(f"{self.seed}-subsample").sample(range(len(records)), self.num_samples))
                records = [records[i] for i in keep]
            self._records = records
        return self._records

    @property
    def questions_path(self) -> Path | None:
        """The questions file in use (given, or found beside a GPTFuzz label file)."""
        if self.questions is not None:
            return Path(self.questions).expanduser()
        return default_questions(self.labels)

    @property
    def data_sha256(self) -> str:
        """SHA-256 of the label file."""
        if self._sha256 is None:
            self._sha256 = file_sha256(Path(self.labels).expanduser())
        return self._sha256

    def splits(self) -> tuple[list[LabelledResponse], list[LabelledResponse]]:
        """(train, held-out validation), stratified and seeded (:func:`stratified_split`)."""
        return stratified_split(self.records(), self.val_fraction, self.seed)

    def fold(self, k: int, n_folds: int) -> tuple[list[LabelledResponse], list[LabelledResponse]]:
        """(train, val) of fold ``k`` of a stratified ``n_folds``-fold split of the *training* part of
        :meth:`splits` (the held-out part is never in it)."""
        return stratified_fold(self.splits()[0], k, n_folds, self.seed)

    def training_split(self) -> tuple[list[LabelledResponse], list[LabelledResponse]]:
        """What fit trains and validates on: :meth:`fold` ``(cv_fold, cv_folds)`` when cross-validating,
        else :meth:`splits`. Both classes must be present in the training part."""
        train, val = self.fold(self.cv_fold, self.cv_folds) if self.cv_folds >= 2 else self.splits()
        negative, positive = class_counts(train)
        if not negative or not positive:
            raise DataError(f"{self.labels}: the training part has {negative} safe (0) and {positive} jailbroken (1) "
                            f"records in column {self.fields['label_field']!r}; a judge needs both")
        return train, val

    @property
    def class_weights(self) -> torch.Tensor:
        """Inverse class frequency of the training part, ``n / (2 * n_class)`` per class (float32, [w0, w1]):
        the weights of a class-balanced cross-entropy."""
        train = self.training_split()[0]
        counts = class_counts(train)
        return torch.tensor([len(train) / (2 * c) for c in counts], dtype=torch.float32)

    def describe(self) -> dict[str, Any]:
        """A JSON-able description: files, hashes, sizes and class counts of the parts in use."""
        train, val = self.training_split()
        questions = self.questions_path
        return {"labels": str(self.labels), "sha256": self.data_sha256,
                "questions": None if questions is None else str(questions),
                "questions_sha256": None if questions is None else file_sha256(questions),
                **self.fields, "n_records": len(self.records()), "val_fraction": self.val_fraction,
                "seed": self.seed, "num_samples": self.num_samples, "cv_folds": self.cv_folds,
                "cv_fold": self.cv_fold if self.cv_folds >= 2 else None, "test_part": self.test_part,
                "train_size": len(train), "val_size": len(val),
                "train_class_counts": list(class_counts(train)), "val_class_counts": list(class_counts(val))}

    # -- Lightning ---------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        self.records()  # a bad file fails before the model is loaded

    def setup(self, stage: str | None = None) -> None:
        self.records()
        if stage in ("fit", "validate"):
            self.training_split()

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _sharded_loader(self, records: Sequence[LabelledResponse]) -> DataLoader:
        shard = weighted_shard(records, *self._rank())
        return DataLoader(shard, batch_size=self.batch_size, sampler=PreShardedSampler(shard), collate_fn=_as_list,
                          num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        """Shuffled (by seed and epoch) lists of :class:`LabelledResponse`."""
        train = self.training_split()[0]
        return ResumableDataLoader(train, batch_size=self.batch_size, sampler=EpochSeededSampler(len(train), self.seed),
                                   collate_fn=_as_list, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        """This rank's share of the validation part, lists of :class:`WeightedResponse` (padding: weight 0)."""
        val = self.training_split()[1]
        return self._sharded_loader(val) if val else []

    def test_records(self) -> list[LabelledResponse]:
        """What test reads: every record in use (``test_part: all``), or one part of :meth:`splits`."""
        if self.test_part == "all":
            return self.records()
        train, val = self.splits()
        return val if self.test_part == "val" else train

    def test_dataloader(self) -> DataLoader:
        """This rank's share of :meth:`test_records` (judge validation; by default *every* record in
        use), lists of :class:`WeightedResponse`; the padding copies have weight 0.0 and must not be
        counted."""
        return self._sharded_loader(self.test_records())

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
