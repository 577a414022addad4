"""Callbacks that drop into existing Lightning projects.

    from lit_safety import SafetyPreservingCallback
    trainer = L.Trainer(callbacks=[SafetyPreservingCallback(mask="outputs/esi/mask.safetensors")])
    trainer.fit(my_module)   # any LightningModule; the masked weights stay bit-identical
"""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch

from lit_safety.esi.mask import MaskMismatchError, SafetyMask


def find_masked_module(pl_module: torch.nn.Module, mask: SafetyMask) -> torch.nn.Module:
    """The module whose parameter names are the mask's: the LightningModule itself, or the first
    child that holds them (``self.model`` wrapping an HF model, say)."""
    candidates = [pl_module] + [child for _, child in pl_module.named_children()]
    for candidate in candidates:
        names = dict(candidate.named_parameters())
        if all(name in names for name in mask.shapes):
            return candidate
    first = next(iter(mask.shapes))
    raise MaskMismatchError(
        f"no module of {type(pl_module).__name__} (nor its children) has the mask's parameter {first!r}; "
        f"the mask was made for {mask.metadata.get('model', 'another model')!r}"
    )


class SafetyPreservingCallback(L.Callback):
    """Keep a SafetyMask's weights bit-for-bit frozen while any LightningModule trains (SPA).

    Works with any optimizer (AdamW with weight decay, SGD, bitsandbytes 8-bit): the selected
    entries' gradients are zeroed and, after every optimizer step, their saved values are written
    back, so they end exactly as they started. Memory: the k selected values, no dense mask.

    Args:
        mask: a :class:`SafetyMask` or the path of a ``mask.safetensors``.
        verify_on_end: check at the end of fit that every frozen entry is unchanged (raises if not).
    """

    def __init__(self, mask: SafetyMask | str | os.PathLike, verify_on_end: bool = True) -> None:
        super().__init__()
        self.mask = mask if isinstance(mask, SafetyMask) else SafetyMask.load(mask)
        self.verify_on_end = verify_on_end
        self.frozen = None
        self._handles: list[Any] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Runs after configure_model and configure_optimizers, so parameters and optimizers exist.
        from lit_safety.optim import FrozenEntries

        target = find_masked_module(pl_module, self.mask)
        self.mask.check_model(target)
        self.frozen = FrozenEntries(target, self.mask)
        self._handles = [self.frozen.attach(optimizer) for optimizer in trainer.optimizers]

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.frozen is None:
            return
        if self.verify_on_end and not self.frozen.verify():
            raise RuntimeError(f"SafetyPreservingCallback: frozen weights moved (max drift {self.frozen.max_abs_drift()})")
        for handle in self._handles:
            handle.remove()
        self.frozen.remove()
