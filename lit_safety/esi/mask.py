"""``SafetyMask``: which weights were selected, as sorted flat indices per parameter.

Stored as safetensors (never pickle): for each parameter with a selected entry, ``<name>.indices``
(int64, ascending flat indices) and ``<name>.scores`` (float32, the score of each selected entry);
the safetensors metadata holds a JSON header with the shapes of every scored parameter and how the
mask was made (model, objective, scope, ratio, N, k, data set, seed, library version). No dense
mask the size of the model exists anywhere.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lit_safety import __version__
from lit_safety.io import atomic_file

FORMAT = "lit-safety-mask/1"


class MaskMismatchError(ValueError):
    """The mask was made for a model with other parameter names or shapes."""


@dataclass
class SafetyMask:
    """Selected entries per parameter.

    Attributes:
        indices: name -> ascending int64 flat indices of selected entries.
        shapes: name -> shape of every parameter the selection ran over (also those with no
            selected entry), used to check that a model matches.
        scores: name -> float32 scores of the selected entries (same order as ``indices``).
        metadata: how the mask was made (JSON-serialisable values).
    """

    indices: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]]
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, idx in self.indices.items():
            if name not in self.shapes:
                raise ValueError(f"mask selects entries of {name!r} but has no shape for it")
            numel = _numel(self.shapes[name])
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
                raise ValueError(f"mask indices of {name!r} fall outside its {numel} entries")

    # -- sizes -----------------------------------------------------------------------------------
    @property
    def k(self) -> int:
        return sum(int(i.numel()) for i in self.indices.values())

    @property
    def n(self) -> int:
        return sum(_numel(s) for s in self.shapes.values())

    @property
    def ratio(self) -> float:
        return self.k / self.n if self.n else 0.0

    def counts(self) -> dict[str, int]:
        return {name: int(self.indices[name].numel()) if name in self.indices else 0 for name in self.shapes}

    # -- model checks ----------------------------------------------------------------------------
    def check_model(self, model: torch.nn.Module | Mapping[str, torch.Tensor]) -> None:
        """Raise :class:`MaskMismatchError` naming the first parameter that does not match."""
        named = dict(model.named_parameters()) if isinstance(model, torch.nn.Module) else dict(model)
        for name, shape in self.shapes.items():
            if name not in named:
                hint = _closest(name, named)
                raise MaskMismatchError(
                    f"mask parameter {name!r} is not in the model{f' (closest: {hint!r})' if hint else ''}; "
                    f"the mask was made for {self.metadata.get('model', 'another model')!r}"
                )
            actual = tuple(named[name].shape)  # a DTensor's shape is the global one
            if actual != tuple(shape):
                raise MaskMismatchError(f"mask parameter {name!r} has shape {tuple(shape)} but the model's is {actual}")

    def bool_mask(self, name: str) -> torch.Tensor:
        """Dense boolean mask of one parameter (for tests and small tensors only)."""
        mask = torch.zeros(_numel(self.shapes[name]), dtype=torch.bool)
        if name in self.indices:
            mask[self.indices[name]] = True
        return mask.view(self.shapes[name])

    # -- files -----------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically as safetensors; returns the path."""
        from safetensors.torch import save

        path = Path(path)
        tensors = {}
        for name, idx in self.indices.items():
            tensors[f"{name}.indices"] = idx.detach().to(torch.int64).contiguous().cpu()
            if name in self.scores:
                tensors[f"{name}.scores"] = self.scores[name].detach().to(torch.float32).contiguous().cpu()
        header = {"format": FORMAT, "library_version": __version__, "k": self.k, "n": self.n,
                  "shapes": {n: list(s) for n, s in self.shapes.items()}, **self.metadata}
        with atomic_file(path, "wb") as handle:
            handle.write(save(tensors, metadata={"lit_safety": json.dumps(header)}))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> SafetyMask:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"mask file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = json.loads((handle.metadata() or {}).get("lit_safety", "null"))
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as err:  # noqa: BLE001 - any decoding failure means "not a mask file"
            raise ValueError(f"{path} is not a safetensors mask file: {err}") from err
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ValueError(f"{path} is not a lit-safety mask (no {FORMAT!r} header)")
        header.pop("format")
        try:
            shapes = _header_shapes(header.pop("shapes", None))
            indices = {k.removesuffix(".indices"): v for k, v in tensors.items() if k.endswith(".indices")}
            scores = {k.removesuffix(".scores"): v for k, v in tensors.items() if k.endswith(".scores")}
            return cls(indices=indices, shapes=shapes, scores=scores, metadata=header)
        except ValueError as err:  # a header or tensors that SafetyMask.save never writes
            raise ValueError(f"{path}: damaged lit-safety mask: {err}; recompute the mask") from None


def _header_shapes(shapes: Any) -> dict[str, tuple[int, ...]]:
    """The ``shapes`` of a mask file's header, checked: name -> tuple of non-negative sizes."""
    if shapes is None:
        raise ValueError("its header has no 'shapes' (the shape of every scored parameter)")
    if not isinstance(shapes, dict):
        raise ValueError(f"'shapes' must map parameter names to lists of sizes, got {type(shapes).__name__}")
    out = {}
    for name, shape in shapes.items():
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise ValueError(f"'shapes' must map parameter names to lists of sizes, got {name!r}: {shape!r}")
        out[name] = tuple(shape)
    return out


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _closest(name: str, names) -> str | None:
    import difflib

    match = difflib.get_close_matches(name, list(names), n=1)
    return match[0] if match else None
