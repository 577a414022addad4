"""Model loading and parameter-name parsing shared by every module."""

from lit_safety.models.loading import (
    ModelLoadError,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    resolve_model_path,
)
from lit_safety.models.naming import ParamLocation, parse_param_name

__all__ = [
    "ModelLoadError",
    "ParamLocation",
    "load_model",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "parse_param_name",
    "resolve_model_path",
]
