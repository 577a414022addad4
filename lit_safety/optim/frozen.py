"""``FrozenEntries``: keep the mask's selected entries bit-identical under any optimizer (SPA).

Safety-Preserving Adaptation trains everything except the safety-critical entries. Zeroing
their gradients is not enough: decoupled weight decay (AdamW), L2 decay folded into momentum
(SGD), stale momentum and quantised optimizer states (bitsandbytes 8-bit) all move an entry
whose gradient is zero. So this class

1. stores the original values of the selected entries once (O(k): ``values[name] =
   p.view(-1)[indices]``; no dense mask, no dense copy of the model),
2. zeroes those gradient entries after each backward (post-accumulate-grad hook, in place), so
   they add nothing to gradient norms/clipping and the optimizer's moments for them stay ~0,
3. copies the stored values back after every optimizer step (``restore``, wired up by
   :meth:`FrozenEntries.attach` as a step post-hook). The copy is exact, so the entries are
   bit-identical whatever the optimizer computed.

A parameter whose every entry is selected is additionally set to ``requires_grad=False`` (no
gradient is ever allocated for it and optimizers skip it).

DTensor parameters (FSDP2/TP) are handled when every placement is ``Replicate`` or ``Shard(0)``:
the local shard is then a contiguous block of rows, so global flat indices map to local ones by
subtracting the shard's offset and each rank keeps only its own entries. Other placements raise
``NotImplementedError`` rather than silently leaving entries unfrozen.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from lit_safety.esi.mask import SafetyMask
from lit_safety.optim.sparse_adamw import ParamsLike, masked_parameters, named_parameters_of
from lit_safety.parallel import is_dtensor, local_flat_indices, local_tensor

__all__ = ["FrozenEntries"]

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass
class _Entry:
    name: str
    param: Tensor
    indices: Tensor  # local flat indices (into the local shard for DTensor)
    values: Tensor  # original values, same dtype as the parameter


class FrozenEntries:
    """Hold the mask's selected entries of ``model_or_params`` fixed through training.

    Usage::

        frozen = FrozenEntries(model, mask)      # before building the optimizer
        optimizer = torch.optim.AdamW(p for p in model.parameters() if p.requires_grad)
        frozen.attach(optimizer)                 # restore() after every optimizer.step()
        ...
        assert frozen.verify()

    Args:
        model_or_params: a model or a ``name -> parameter`` mapping.
        mask: the entries to freeze.
        zero_grads: zero the frozen gradient entries after each backward (hook).
        freeze_full: set ``requires_grad=False`` on parameters whose every entry is frozen.
    """

    def __init__(
        self,
        model_or_params: ParamsLike,
        mask: SafetyMask,
        *,
        zero_grads: bool = True,
        freeze_full: bool = True,
    ) -> None:
        self.entries: list[_Entry] = []
        self._hooks: list[RemovableHandle] = []
        for name, (p, idx) in masked_parameters(named_parameters_of(model_or_params), mask).items():
            local = local_tensor(p)
            full = idx.numel() == p.numel()  # global count, also for DTensor shards
            if is_dtensor(p):
                idx = local_flat_indices(name, p, idx)
            if not local.is_contiguous():
                raise ValueError(f"{name!r} is not contiguous; its flat indices cannot be written in place")
            values = local.detach().view(-1).index_select(0, idx)
            entry = _Entry(name=name, param=p, indices=idx, values=values)
            self.entries.append(entry)
            if freeze_full and full:
                p.requires_grad_(False)
            elif zero_grads and p.requires_grad:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._zero_hook(entry)))

    # -- sizes -----------------------------------------------------------------------------------
    @property
    def k(self) -> int:
        """Frozen entries held by this process."""
        return sum(e.indices.numel() for e in self.entries)

    def nbytes(self) -> int:
        """Bytes of the stored values (indices are shared with the mask on the same device)."""
        return sum(e.values.nbytes for e in self.entries)

    # -- training hooks --------------------------------------------------------------------------
    @staticmethod
    def _zero_hook(entry: _Entry):
        def hook(p: Tensor) -> None:
            if p.grad is not None:
                with torch.no_grad():
                    local_tensor(p.grad).view(-1).index_fill_(0, entry.indices, 0)

        return hook

    @torch.no_grad()
    def restore(self) -> None:
        """Write the stored values back (exact copy, so bit-identical to the original)."""
        for e in self.entries:
            local_tensor(e.param).view(-1).index_copy_(0, e.indices, e.values)

    def attach(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Call :meth:`restore` after every ``optimizer.step()`` (any ``torch.optim.Optimizer``)."""
        handle = optimizer.register_step_post_hook(self._after_step)
        self._hooks.append(handle)
        return handle

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.restore()

    def remove(self) -> None:
        """Remove the gradient hooks and optimizer hooks (values are kept)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    # -- checks ----------------------------------------------------------------------------------
    def _current(self, e: _Entry, named: Mapping[str, Tensor] | None) -> Tensor:
        p = named[e.name] if named is not None else e.param
        return local_tensor(p).detach().reshape(-1).index_select(0, e.indices)

    @torch.no_grad()
    def verify(self, model: ParamsLike | None = None) -> bool:
        """True when every frozen entry has its original bit pattern (NaN- and -0.0-exact).

        ``model`` lets the check run on another instance (e.g. a reloaded checkpoint) with the
        same parameter names; by default the parameters given at construction are checked.
        """
        named = named_parameters_of(model) if model is not None else None
        for e in self.entries:
            current = self._current(e, named)
            if current.dtype != e.values.dtype:
                return False
            bits = _BITS[e.values.element_size()]
            if not torch.equal(current.view(bits), e.values.view(bits)):
                return False
        return True

    @torch.no_grad()
    def max_abs_drift(self, model: ParamsLike | None = None) -> float:
        """Largest ``|current - original|`` over the frozen entries (0.0 when frozen)."""
        named = named_parameters_of(model) if model is not None else None
        drift = 0.0
        for e in self.entries:
            if e.values.numel():
                diff = (self._current(e, named).double() - e.values.double()).abs().max()
                drift = max(drift, float(diff))
        return drift
