"""``SparseAdamW``: AdamW over the selected entries of a :class:`SafetyMask` only (SET).

Safety-critical Entry Training updates ~1% of the weights. The reference way to do that -- a
dense AdamW plus a dense boolean mask that zeroes the other gradients and restores the other
values -- pays for the full optimizer state (2 x N floats), a dense mask and a dense copy of
the weights, although only k << N entries ever move. Here the optimizer state is O(k): per
parameter the flat ``indices`` of its selected entries (shared with the mask, no copy on the
same device), ``exp_avg`` and ``exp_avg_sq`` of shape ``[k_p]`` and a ``step`` counter.

A step gathers ``g = grad.view(-1)[indices]`` and ``w = param.view(-1)[indices]``, runs exactly
the update of ``torch.optim.AdamW`` (single-tensor path: decoupled weight decay
``w *= 1 - lr * wd`` on the selected entries only, ``lerp`` for the first moment, bias
corrections, ``eps`` added after the bias-corrected square root) and scatters ``w`` back with
``index_copy_``. Entries that are not selected are never written, so they stay bit-identical.

Half-precision parameters (bf16/fp16) get float32 state *and a float32 master copy* of their
selected entries (``master``, O(k) like the moments): the update is applied to the master and only
written to the parameter rounded. Without it an AdamW step of lr 2e-5 on weights of ~0.02 is below
half a bf16 ulp and is lost (measured: 30% of the entries moved in 10 steps, 100% with masters).
If the parameter's selected entries were changed from outside (a weight load, ``torch.no_grad()``
edits) the master re-syncs to them before the next update. float32/float64 parameters are their
own master (state in the parameter's dtype).

Memory-lean mode (``step_in_backward=True``): a ``register_post_accumulate_grad_hook`` on each
masked parameter applies its sparse update as soon as its gradient is complete and then frees
that gradient (``p.grad = None``). Peak memory is then ~ weights + activations + the largest
single gradient + O(k) state, instead of weights + all gradients. Consequences:

* gradient clipping across parameters (``clip_grad_norm_``, Lightning ``gradient_clip_val``)
  is impossible -- when it would run, the gradients are already applied and gone;
* gradient accumulation is impossible (every backward is a step): use
  ``accumulate_grad_batches=1``;
* fp16 ``GradScaler`` (unscale/inf checks before the step) is not supported; bf16 is fine.
``optimizer.step(closure)`` still runs the closure (Lightning calls it that way) and updates any
parameter that still holds a gradient, so both modes give identical results.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lit_safety.esi.mask import MaskMismatchError, SafetyMask
from lit_safety.parallel import is_dtensor, local_flat_indices, local_tensor

__all__ = ["SparseAdamW", "prepare_model", "named_parameters_of", "masked_parameters"]

ParamsLike = nn.Module | Mapping[str, Tensor]


# ------------------------------------------------------------------------------------ helpers
def named_parameters_of(model_or_params: ParamsLike) -> dict[str, Tensor]:
    """name -> parameter; for a module every name, also tied aliases (``remove_duplicate=False``)."""
    if isinstance(model_or_params, nn.Module):
        return dict(model_or_params.named_parameters(remove_duplicate=False))
    return dict(model_or_params)


def masked_parameters(named: Mapping[str, Tensor], mask: SafetyMask) -> dict[str, tuple[Tensor, Tensor]]:
    """name -> (parameter, its selected flat indices on the parameter's device).

    Only parameters with at least one selected entry are returned. Checks that every such name
    exists with the mask's shape, that indices are 1-D int64 and strictly increasing (sorted and
    duplicate-free: a duplicate would be updated twice and make ``index_copy_`` ambiguous), and
    that no parameter is selected under two (tied) names.
    """
    out: dict[str, tuple[Tensor, Tensor]] = {}
    owner: dict[int, str] = {}
    for name, idx in mask.indices.items():
        if idx.numel() == 0:
            continue
        if name not in named:
            raise MaskMismatchError(f"mask selects entries of {name!r}, which is not among the given parameters")
        p = named[name]
        if tuple(p.shape) != tuple(mask.shapes[name]):
            raise MaskMismatchError(f"mask parameter {name!r} has shape {tuple(mask.shapes[name])} "
                                    f"but the model's is {tuple(p.shape)}")
        if id(p) in owner:
            raise ValueError(f"{name!r} and {owner[id(p)]!r} are the same (tied) parameter and both have "
                             "selected entries; merge them into one name in the mask")
        owner[id(p)] = name
        if idx.dtype != torch.int64 or idx.dim() != 1:
            raise ValueError(f"mask indices of {name!r} must be a 1-D int64 tensor, got {idx.dtype} {tuple(idx.shape)}")
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise ValueError(f"mask indices of {name!r} must be strictly increasing (sorted, no duplicates)")
        device = local_tensor(p).device
        out[name] = (p, idx.to(device))
    return out


def prepare_model(model: nn.Module, mask: SafetyMask) -> dict[str, nn.Parameter]:
    """Make exactly the parameters with a selected entry trainable; return them by name.

    Every other parameter gets ``requires_grad=False``, so autograd never allocates its dense
    gradient (for a 1% mask over the decoder matrices that skips the embedding, LM head and
    norm gradients entirely).
    """
    mask.check_model(model)
    selected = masked_parameters(named_parameters_of(model), mask)
    trainable_ids = {id(p) for p, _ in selected.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable_ids)
    return {name: p for name, (p, _) in selected.items()}  # type: ignore[misc]


def _state_dtype(p: Tensor) -> torch.dtype:
    return p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32


# ---------------------------------------------------------------------------------- optimizer
class SparseAdamW(torch.optim.Optimizer):
    """AdamW that reads and writes only the mask's selected entries (see module docstring).

    Args:
        params: a model or a ``name -> parameter`` mapping; only parameters with a selected
            entry join the optimizer. They must require grad (see :func:`prepare_model`).
        mask: the selection; indices are global flat indices into each parameter.
        lr, betas, eps, weight_decay, maximize: as in ``torch.optim.AdamW``.
        step_in_backward: apply each parameter's update in its post-accumulate-grad hook and
            free its gradient right away (memory-lean; no cross-parameter clipping, no
            gradient accumulation).
    """

    def __init__(
        self,
        params: ParamsLike,
        mask: SafetyMask,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        maximize: bool = False,
        *,
        step_in_backward: bool = False,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"invalid learning rate {lr}")
        if eps < 0.0:
            raise ValueError(f"invalid eps {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}")
        if weight_decay < 0.0:
            raise ValueError(f"invalid weight_decay {weight_decay}")
        selected = masked_parameters(named_parameters_of(params), mask)
        if not selected:
            raise ValueError("the mask selects no entry of the given parameters")
        for name, (p, idx) in list(selected.items()):
            if is_dtensor(p):  # FSDP2 shard: keep the indices that fall into this rank's rows, made local
                selected[name] = (p, local_flat_indices(name, p, idx))
            if not p.is_floating_point():
                raise ValueError(f"{name!r} is not a floating-point parameter")
            if not p.requires_grad:
                raise ValueError(f"{name!r} has selected entries but requires_grad=False; "
                                 "call prepare_model(model, mask)")
            if not local_tensor(p).is_contiguous():
                raise ValueError(f"{name!r} is not contiguous; its flat indices cannot be written in place")

        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, maximize=maximize)
        # Named params: torch keeps ``param_names`` in each group, which makes state dicts readable.
        super().__init__([(name, p) for name, (p, _) in selected.items()], defaults)
        self._indices: dict[int, Tensor] = {id(p): idx for p, idx in selected.values()}
        # Group position of every parameter; looked up by position because load_state_dict
        # replaces the group dicts (so a reference to the dict would go stale).
        self._group_index: dict[int, int] = {
            id(p): gi for gi, group in enumerate(self.param_groups) for p in group["params"]
        }
        for group in self.param_groups:
            for p in group["params"]:
                self._init_state(p)
        self.step_in_backward = step_in_backward
        self._hooks: list[RemovableHandle] = []
        if step_in_backward:
            for group in self.param_groups:
                for p in group["params"]:
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._step_in_backward_hook))

    # -- state -----------------------------------------------------------------------------------
    def _init_state(self, p: Tensor) -> None:
        """Eager O(k_p) state (so ``state_numel`` and ``state_dict`` are valid before step 1)."""
        if id(p) not in self._indices:
            raise ValueError("SparseAdamW only handles the parameters of its mask (add_param_group is not supported)")
        idx = self._indices[id(p)]
        dtype = _state_dtype(p)
        device = local_tensor(p).device
        self.state[p] = {
            "step": torch.tensor(0.0, dtype=torch.float32),
            "indices": idx,
            "exp_avg": torch.zeros(idx.numel(), dtype=dtype, device=device),
            "exp_avg_sq": torch.zeros(idx.numel(), dtype=dtype, device=device),
        }
        if dtype != p.dtype:  # half-precision parameter: float32 master values of the selected entries
            with torch.no_grad():
                self.state[p]["master"] = local_tensor(p).reshape(-1).index_select(0, idx).to(dtype)

    def state_numel(self) -> int:
        """Optimizer-state elements (first + second moments, + float32 masters of half-precision
        parameters): ``2 * mask.k`` (``3 * mask.k`` for bf16/fp16) -- O(k), not O(N)."""
        return sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() + (s["master"].numel() if "master" in s else 0)
                   for s in self.state.values())

    def state_nbytes(self, include_indices: bool = True) -> int:
        """Bytes held in state: moments, masters, and the int64 indices (shared with the mask on the same device)."""
        total = 0
        for s in self.state.values():
            total += s["exp_avg"].nbytes + s["exp_avg_sq"].nbytes + (s["master"].nbytes if "master" in s else 0)
            if include_indices:
                total += s["indices"].nbytes
        return total

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load hyper-parameters and moments without the base class's dtype casts.

        ``torch.optim.Optimizer.load_state_dict`` casts every floating state tensor to the
        parameter's dtype and every tensor to the parameter's device -- that would turn float32
        moments of a bf16 parameter into bf16 (and the int64 indices are kept only because they
        are integers). So the base class loads the groups and hooks, and the moments are copied
        into freshly allocated state here. The saved indices must equal this optimizer's (same
        mask), otherwise the moments would belong to other entries.
        """
        saved_state = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params, strict=True):
            self._init_state(p)
            if saved_id not in saved_state:
                continue
            saved, state = saved_state[saved_id], self.state[p]
            if not torch.equal(saved["indices"].to(state["indices"].device), state["indices"]):
                raise ValueError("optimizer state was saved for another mask (selected indices differ)")
            state["step"] = torch.as_tensor(saved["step"], dtype=torch.float32).detach().clone().cpu()
            state["exp_avg"].copy_(saved["exp_avg"])
            state["exp_avg_sq"].copy_(saved["exp_avg_sq"])
            if "master" in state and "master" in saved:  # else: re-read from the (loaded) weights above
                state["master"].copy_(saved["master"])

    # -- update ----------------------------------------------------------------------------------
    def _update(self, p: Tensor, group: dict[str, Any]) -> None:
        """One AdamW step on the selected entries of ``p`` (same op order as torch's AdamW).

        For a DTensor shard the local gradient and weights are used with local indices."""
        grad = p.grad
        if grad is None:
            return
        grad = local_tensor(grad)
        if grad.is_sparse:
            raise RuntimeError("SparseAdamW does not support sparse gradients")
        state = self.state[p]
        idx, exp_avg, exp_avg_sq, step_t = state["indices"], state["exp_avg"], state["exp_avg_sq"], state["step"]
        beta1, beta2 = group["betas"]
        lr, wd, eps = float(group["lr"]), group["weight_decay"], group["eps"]

        g = grad.reshape(-1).index_select(0, idx).to(exp_avg.dtype)
        if group["maximize"]:
            g.neg_()
        flat = local_tensor(p).view(-1)
        w = flat.index_select(0, idx)
        if "master" in state:  # update the float32 master; resync entries changed from outside first
            master = state["master"]
            stale = master.to(p.dtype) != w
            if bool(stale.any()):
                master[stale] = w[stale].to(master.dtype)
            w = master
        else:
            w = w.to(exp_avg.dtype)

        step_t += 1
        if wd != 0:
            w.mul_(1 - lr * wd)
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step = step_t.item()
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
        w.addcdiv_(exp_avg, denom, value=-step_size)
        flat.index_copy_(0, idx, w.to(p.dtype))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update every parameter that holds a gradient (none left in step-in-backward mode)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                self._update(p, group)
        return loss

    def _step_in_backward_hook(self, p: Tensor) -> None:
        with torch.no_grad():
            self._update(p, self.param_groups[self._group_index[id(p)]])
        p.grad = None
