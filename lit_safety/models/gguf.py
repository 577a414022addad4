"""GGUF files as a model source: dequantized once into a plain float Hugging Face model, cached.

A ``model:`` value names a GGUF model in one of two forms:

- ``path/to/model.gguf``: a local file;
- ``<dir or hub id>::<file>.gguf``: a file inside a local directory, or inside a Hugging Face hub
  repository (downloaded once by ``huggingface_hub`` into its own cache).

The first use reads the file with transformers' GGUF reader (the ``gguf`` and ``accelerate``
packages: ``pip install -e ".[gguf]"``), dequantizes it to float32, and saves a plain
``*ForCausalLM`` (its ``quantization_config`` dropped, so it saves, trains and reloads like any
model) with the tokenizer and chat template from the same file, as safetensors under
``$LIT_SAFETY_CACHE/gguf/<stem>-<sha256[:16]>/``. The key is the file's SHA-256, so a changed file
converts again and later runs load the safetensors in seconds. ``gguf_source.json`` in the entry
records the file, its hash and the transformers version that converted it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lit_safety.io import atomic_dir, cache_root, directory_lock, file_sha256, write_json

SEPARATOR = "::"
SUFFIX = ".gguf"
INSTALL = 'pip install -e ".[gguf]"  (or: pip install gguf accelerate)'
SOURCE_RECORD = "gguf_source.json"
CONVERTER_VERSION = 1
"""Bump when a change here changes what a conversion writes (part of the cache key)."""


class GGUFError(ValueError):
    """A GGUF model spec cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class GGUFSpec:
    """Where a GGUF file is: ``repo`` (a local directory or hub id; None for a plain path) and ``file``."""

    repo: str | None
    file: str

    def __str__(self) -> str:
        return self.file if self.repo is None else f"{self.repo}{SEPARATOR}{self.file}"


def parse_gguf_spec(name: str | os.PathLike) -> GGUFSpec | None:
    """The GGUF file ``name`` refers to, or None when it is not a GGUF spec (a hub id, a directory)."""
    name = os.fspath(name)
    repo, sep, file = name.partition(SEPARATOR)
    if sep:
        if not repo or not file:
            raise GGUFError(f"model {name!r}: expected <directory or hub id>{SEPARATOR}<file>{SUFFIX}")
        if not file.lower().endswith(SUFFIX):
            raise GGUFError(f"model {name!r}: the part after {SEPARATOR!r} must be a {SUFFIX} file name, got {file!r}")
        return GGUFSpec(repo, file)
    if name.lower().endswith(SUFFIX):
        return GGUFSpec(None, name)
    return None


def check_gguf_packages() -> None:
    """A clear error naming the install command when transformers cannot read GGUF here."""
    missing = [p for p in ("gguf", "accelerate") if importlib.util.find_spec(p) is None]
    if missing:
        raise GGUFError(f"reading GGUF files needs the package(s) {', '.join(missing)}: {INSTALL}")


def local_gguf_file(spec: GGUFSpec) -> Path:
    """The GGUF file on disk: checked for a local path, downloaded (once) for a hub repository."""
    if spec.repo is None:
        path = Path(spec.file).expanduser()
    elif Path(spec.repo).expanduser().is_dir():
        path = Path(spec.repo).expanduser() / spec.file
    elif spec.repo.startswith((".", "/", "~")) or spec.repo.count("/") > 1:
        raise GGUFError(f"model {spec}: directory {Path(spec.repo).expanduser()} does not exist")
    else:
        from huggingface_hub import hf_hub_download  # noqa: PLC0415 - a transformers dependency, only for hub files

        try:
            return Path(hf_hub_download(spec.repo, spec.file))
        except Exception as err:  # hub errors come in many classes (offline, 404, auth)
            raise GGUFError(f"model {spec}: could not get {spec.file!r} from hub repository {spec.repo!r}: "
                            f"{type(err).__name__}: {err}") from err
    if not path.is_file():
        raise GGUFError(f"GGUF file {path} does not exist" if not path.exists()
                        else f"GGUF path {path} is not a file")
    return path


def read_metadata(path: Path) -> dict[str, object]:
    """Architecture, name and whether a chat template is present, from the file's header only."""
    check_gguf_packages()
    from gguf import GGUFReader  # noqa: PLC0415 - optional package, checked just above
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES  # noqa: PLC0415

    try:
        reader = GGUFReader(path)
    except Exception as err:  # numpy/struct errors on a truncated or foreign file
        raise GGUFError(f"{path} is not a readable GGUF file: {type(err).__name__}: {err}") from err

    def field(key: str) -> str | None:
        found = reader.fields.get(key)
        return None if found is None else str(found.contents())

    architecture = field("general.architecture")
    if architecture is None:
        raise GGUFError(f"GGUF file {path} has no general.architecture in its metadata")
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"GGUF file {path}: architecture {architecture!r} cannot be read by transformers "
                        f"(it reads: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})")
    return {"architecture": architecture, "name": field("general.name"),
            "chat_template": field("tokenizer.chat_template") is not None}


@functools.lru_cache(maxsize=32)
def _sha256(resolved: str, size: int, mtime_ns: int) -> str:
    return file_sha256(resolved)


def gguf_sha256(path: Path) -> str:
    """SHA-256 of GGUF ``path``, hashed once per process while its size and mtime stay the same
    (a model name resolves several times per run: model, tokenizer, reference model)."""
    stat = path.stat()
    return _sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def converted_dir(path: Path) -> Path:
    """Where GGUF file ``path`` is (or will be) converted: keyed by the file's hash and the converter."""
    stem = "".join(c if c.isalnum() or c in "-_." else "-" for c in path.stem)
    return cache_root() / "gguf" / f"{stem}-{gguf_sha256(path)[:16]}-c{CONVERTER_VERSION}" / "model"


def is_converted(model_dir: Path) -> bool:
    """Whether ``model_dir`` holds a complete conversion: its source record is written last."""
    return (model_dir / SOURCE_RECORD).is_file()


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def convert(path: Path, out: Path) -> None:
    """Dequantize GGUF ``path`` into a plain float32 HF model + tokenizer saved in ``out``."""
    import torch  # noqa: PLC0415 - keeps the spec parsing above free of heavy imports
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    try:
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise GGUFError(f"could not read GGUF file {path}: {type(err).__name__}: {err}") from err
    config = loaded.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = torch.float32
    # A plain model of the same class: the GGUF-loaded one is marked quantized and refuses to save.
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def gguf_model_dir(spec: GGUFSpec, *, build: bool = True,
                   log_line: Callable[[str], None] = _stderr) -> Path:
    """The cached HF directory of GGUF model ``spec``: converted on first use (under a lock, atomically)."""
    path = local_gguf_file(spec)
    model_dir = converted_dir(path)
    root = model_dir.parent
    if is_converted(model_dir):
        return model_dir
    meta = read_metadata(path)
    if not meta["chat_template"]:
        raise GGUFError(f"GGUF file {path} has no chat template (tokenizer.chat_template in its metadata); "
                        "lit-safety formats every prompt with the model's chat template: use a chat/instruct GGUF")
    if not build:
        raise FileNotFoundError(f"GGUF model {spec} is not converted yet (expected at {model_dir})")
    with directory_lock(root):
        if not is_converted(model_dir):  # another process may have converted it meanwhile
            log_line(f"[gguf] converting {path} ({meta['architecture']}, {meta['name']}) to float32 safetensors "
                     f"in {model_dir} (once; tens of seconds on a CPU)")
            with atomic_dir(model_dir) as tmp:
                convert(path, tmp)
                # written last: its presence marks a complete entry
                import transformers  # noqa: PLC0415

                write_json(tmp / SOURCE_RECORD, {"gguf_file": str(path), "spec": str(spec), "sha256": gguf_sha256(path),
                                                 "size": path.stat().st_size, **meta,
                                                 "transformers_version": transformers.__version__,
                                                 "converter_version": CONVERTER_VERSION})
            log_line(f"[gguf] saved {model_dir}")
    return model_dir


def converted_source(model_dir: str | os.PathLike) -> dict[str, object] | None:
    """The ``gguf_source.json`` record of a converted directory, or None for any other directory."""
    record = Path(model_dir) / SOURCE_RECORD
    with contextlib.suppress(OSError, ValueError):
        return json.loads(record.read_text())
    return None
