"""Load causal LMs and tokenizers by hub id, local HF directory, GGUF file (:mod:`.gguf`), or builtin
name (the organisms and the real builtin models, through :mod:`lit_safety.registry`).

Every module in lit-safety goes through :func:`load_model` / :func:`load_tokenizer`, so the same
rules hold everywhere: ``trust_remote_code`` stays off unless the caller sets it, and a missing or
malformed model fails fast with an error that names the path and what is wrong with it.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from lit_safety.io import cache_root
from lit_safety.models.gguf import GGUFError, gguf_model_dir, parse_gguf_spec
from lit_safety.registry import model_provider

DTYPES: dict[str, torch.dtype | str] = {
    "auto": "auto",
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


class ModelLoadError(ValueError):
    """A model or tokenizer could not be found or is malformed; the message names the path."""


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    """Map a config string such as ``"bf16"`` to a torch dtype (``None`` keeps the default)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ModelLoadError(f"dtype={dtype!r} is not supported; choose one of {sorted(DTYPES)}")
    return DTYPES[key]


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else is meant as a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def resolve_model_path(name_or_path: str | os.PathLike, *, build_organism: bool = True) -> str:
    """Return what ``from_pretrained`` should receive for ``name_or_path``.

    - a builtin name (``organism-dense-aligned``, ``smollm2-135m-instruct`` ...) -> its cached HF
      directory, built on first use;
    - a GGUF file (``model.gguf``, ``<dir or hub id>::<file>.gguf``) -> its cached float conversion;
    - an existing local directory -> checked for a readable ``config.json``;
    - anything else that looks like a path -> :class:`ModelLoadError`;
    - otherwise it is taken as a Hugging Face hub id and returned unchanged.
    """
    name = os.fspath(name_or_path)
    if not name:
        raise ModelLoadError("model name or path is empty")
    try:
        gguf = parse_gguf_spec(name)
        if gguf is not None:
            return str(gguf_model_dir(gguf))
    except GGUFError as err:
        raise ModelLoadError(str(err)) from None
    provider = model_provider(name)  # the organisms, the real builtins (lit_safety.registry)
    if provider is not None:
        try:
            provider.check(name)
        except ValueError as err:
            raise ModelLoadError(str(err)) from None
        try:
            return str(provider.resolve(name, build_organism))
        except GGUFError as err:  # a builtin that is a GGUF file
            raise ModelLoadError(str(err)) from None
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model path {path} is a file; expected a directory in Hugging Face format")
        config = path / "config.json"
        if not config.is_file():
            raise ModelLoadError(
                f"model directory {path} has no config.json; expected a directory saved with save_pretrained()"
            )
        try:
            json.loads(config.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ModelLoadError(f"model config {config} is not valid JSON: {err}") from err
        return str(path)
    if _looks_like_path(name):
        raise ModelLoadError(f"model path {path} does not exist")
    return name


QUANTIZATIONS = ("8bit", "4bit")


def quantization_config(quantization: str | None, compute_dtype: str | torch.dtype = "bfloat16") -> Any:
    """A transformers ``BitsAndBytesConfig`` for ``"8bit"`` / ``"4bit"`` (NF4) loading, or None.

    Quantized weights are for evaluation and judging of large models on small GPUs: they have no
    gradients, so ESI scoring, SET and SPA need float weights (shard them with FSDP2 instead).
    Needs a CUDA GPU, bitsandbytes and accelerate; anything else is a clear error here, before loading.
    """
    if quantization is None:
        return None
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS} or null, got {quantization!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"quantization={quantization!r} (bitsandbytes) loads weights on a CUDA GPU, and none is "
                         "available; evaluate in float32/bfloat16 on CPU instead")
    import importlib.util

    for package in ("bitsandbytes", "accelerate"):
        if importlib.util.find_spec(package) is None:
            raise ValueError(f"quantization={quantization!r} needs the {package!r} package: pip install {package}")
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=resolve_dtype(compute_dtype))


_MODEL_KINDS = {"AutoModelForCausalLM": "causal LM", "AutoModelForSequenceClassification": "sequence classifier"}


def load_model(
    name_or_path: str | os.PathLike = "organism-dense-aligned",
    *,
    dtype: str | torch.dtype | None = "float32",
    trust_remote_code: bool = False,
    revision: str | None = None,
    attn_implementation: str | None = None,
    quantization_config: Any = None,
    device_map: Any = None,
    auto_class: Any = None,
    **kwargs: Any,
):
    """Load an ``AutoModelForCausalLM`` (or ``auto_class``, e.g. ``AutoModelForSequenceClassification``)
    by hub id, local directory or organism name."""
    if auto_class is None:
        from transformers import AutoModelForCausalLM as auto_class
    what = _MODEL_KINDS.get(auto_class.__name__, auto_class.__name__)

    source = resolve_model_path(name_or_path)
    options: dict[str, Any] = dict(trust_remote_code=trust_remote_code, **kwargs)
    if dtype is not None:
        options["dtype"] = resolve_dtype(dtype)
    for key, value in (
        ("revision", revision),
        ("attn_implementation", attn_implementation),
        ("quantization_config", quantization_config),
        ("device_map", device_map),
    ):
        if value is not None:
            options[key] = value
    try:
        return auto_class.from_pretrained(source, **options)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, pickle.UnpicklingError, SafetensorError) as err:
        raise ModelLoadError(f"could not load a {what} from {_where(source)}: {_weights_problem(source, err)}") from err


def _where(source: str) -> str:
    return f"local directory {source}" if Path(source).exists() else f"hub id {source!r}"


def _weights_problem(source: str, err: BaseException) -> str:
    """What went wrong loading the weights of ``source`` (``from_pretrained``'s error ``err``), naming
    the file and what to do where the error itself names neither:

    - a pickle checkpoint (``*.bin``) that ``torch.load(weights_only=True)`` refused;
    - a damaged safetensors file (safetensors' errors name no path); a directory under lit-safety's
      cache (an organism, a builtin model) is rebuilt on first use once deleted.
    Any other error is passed through as its own message.
    """
    local = Path(source)
    if isinstance(err, pickle.UnpicklingError):
        files = sorted(local.glob("*.bin")) if local.is_dir() else []
        name = ", ".join(str(f) for f in files) or f"a pickle (.bin) weights file of {source}"
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        # torch's message opens with advice to retry with weights_only=False: keep its verdict and reason only
        first_line = " ".join(["Weights only load failed." if lines[0].startswith("Weights only load failed")
                               else lines[0], *lines[1:2]])
        return (f"{name} is a pickle checkpoint that holds more than tensors, and lit-safety loads pickles with "
                "weights_only=True only (loading it fully could run code). Convert it to safetensors where you "
                "trust it (save_pretrained(..., safe_serialization=True)) or use a copy that ships model.safetensors. "
                f"(torch: {first_line})")
    if not isinstance(err, SafetensorError):
        return str(err)
    files = sorted(local.glob("*.safetensors")) if local.is_dir() else []
    name = ", ".join(str(f) for f in files) or "a .safetensors file"
    message = f"a weights file ({name}) is damaged or incomplete: {err}."
    if local.is_dir() and _in_cache(local):
        return f"{message} It is a lit-safety cache entry: delete {local} and rerun to rebuild it."
    return f"{message} Save or download the model again."


def _in_cache(path: Path) -> bool:
    """Whether ``path`` lies under lit-safety's cache (:func:`lit_safety.io.cache_root`)."""
    try:
        path.resolve().relative_to(cache_root().resolve())
    except ValueError:
        return False
    return True


def load_tokenizer(
    name_or_path: str | os.PathLike = "organism-dense-aligned",
    *,
    trust_remote_code: bool = False,
    revision: str | None = None,
    padding_side: str = "left",
):
    """Load the tokenizer that belongs to a model; pad token falls back to eos."""
    from transformers import AutoTokenizer

    source = resolve_model_path(name_or_path)
    local = Path(source)
    if local.is_dir() and not any((local / f).is_file() for f in TOKENIZER_FILES):
        raise ModelLoadError(
            f"model directory {local} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
            "save it with tokenizer.save_pretrained() next to the model"
        )
    options: dict[str, Any] = dict(trust_remote_code=trust_remote_code)
    if revision is not None:
        options["revision"] = revision
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **options)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
        where = f"local directory {source}" if local.exists() else f"hub id {source!r}"
        raise ModelLoadError(f"could not load a tokenizer from {where}: {err}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_model_and_tokenizer(name_or_path: str | os.PathLike = "organism-dense-aligned", **kwargs: Any):
    """Both at once; ``trust_remote_code`` and ``revision`` apply to both."""
    tokenizer_kwargs = {k: kwargs[k] for k in ("trust_remote_code", "revision") if k in kwargs}
    return load_model(name_or_path, **kwargs), load_tokenizer(name_or_path, **tokenizer_kwargs)
