"""Sharding helpers: FSDP2 (``fully_shard``) per decoder layer, local views of DTensor shards, and a
full state dict gathered for export; and the sharding of data sets over ranks with marked padding
(:func:`pad_shard_indices`, :class:`PreShardedSampler`).

lit-safety's modules call :func:`shard_model` from ``configure_model`` when Lightning's
``ModelParallelStrategy`` hands them a device mesh (``configs/strategy/fsdp2.yaml``). Every FSDP2
parameter is a DTensor sharded on dim 0 (``Shard(0)``), so each rank's local tensor is a contiguous
block of rows, i.e. a contiguous flat slice of the full tensor: global flat mask indices map to
local ones by an offset.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DistributedSampler

DECODER_LAYER_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers",
                       "model.language_model.layers", "transformer.blocks")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers (Llama, Mistral, Qwen, Mixtral, Gemma, OPT, GPT-2, ...)."""
    for path in DECODER_LAYER_PATHS:
        module: Any = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return module
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (looked for {DECODER_LAYER_PATHS}); "
                     "shard it yourself in configure_model")


def shard_model(model: nn.Module, device_mesh: Any, *, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2: ``fully_shard`` each decoder layer, then the root (embeddings, norm, LM head).

    ``device_mesh`` is the 2-D mesh of Lightning's ``ModelParallelStrategy``; parameters are
    sharded over its ``data_parallel`` axis. A tensor-parallel axis larger than 1 is rejected:
    lit-safety applies no tensor parallelism, so those ranks would duplicate work.
    """
    from torch.distributed.fsdp import fully_shard

    names = getattr(device_mesh, "mesh_dim_names", None) or ()
    if "tensor_parallel" in names and device_mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            f"the device mesh has tensor_parallel size {device_mesh['tensor_parallel'].size()}; lit-safety shards "
            "with FSDP2 over data_parallel only. Set the strategy's data_parallel_size to the number of devices "
            "and tensor_parallel_size: 1 (configs/strategy/fsdp2.yaml)")
    mesh = device_mesh["data_parallel"] if "data_parallel" in names else device_mesh
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def is_dtensor(t: Tensor) -> bool:
    """True for ``torch.distributed.tensor.DTensor`` (without importing it when unavailable)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def local_tensor(t: Tensor) -> Tensor:
    """The plain tensor holding this rank's data of a DTensor (itself otherwise); shares storage."""
    if is_dtensor(t):
        with torch.no_grad():
            return t.to_local()
    return t


def _row_numel(shape: tuple[int, ...]) -> int:
    return math.prod(int(d) for d in shape[1:])


def local_shard(p: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(this rank's local tensor, its flat offset in the full tensor, the full tensor's numel).

    Plain tensors are their own shard (offset 0). DTensors must be ``Shard(0)`` or replicated.
    """
    if not is_dtensor(p):
        return p, 0, p.numel()
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for placement in p.placements:
        if not (isinstance(placement, Replicate) or (isinstance(placement, Shard) and placement.dim == 0)):
            raise NotImplementedError(f"DTensor placements {p.placements} are not supported (only Shard(0) and "
                                      "Replicate, as FSDP2 produces)")
    local_shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    flat_offset = int(offset[0]) * _row_numel(tuple(p.shape)) if p.dim() > 0 else 0
    return p.to_local(), flat_offset, p.numel()


def row_range(p: torch.Tensor) -> tuple[int, int]:
    """(first row, number of rows) of this rank's shard along dim 0."""
    local, offset, _ = local_shard(p)
    if p.dim() == 0:
        return 0, 1
    return offset // max(1, _row_numel(tuple(p.shape))), int(local.shape[0])


def local_indices(global_indices: Tensor, shape: tuple[int, ...], row_offset: int, local_rows: int) -> Tensor:
    """Sorted global flat indices that fall into rows ``[row_offset, row_offset + local_rows)``, made local."""
    row_numel = _row_numel(shape)
    lo, hi = row_offset * row_numel, (row_offset + local_rows) * row_numel
    start = int(torch.searchsorted(global_indices, lo))
    stop = int(torch.searchsorted(global_indices, hi))
    return global_indices[start:stop] - lo


def local_flat_indices(name: str, p: Tensor, idx: Tensor) -> Tensor:
    """The global flat ``idx`` of a Shard(0) / replicated DTensor ``p`` that fall into this rank's
    rows, made local (``name`` is for the error message)."""
    try:
        first_row, rows = row_range(p)
    except NotImplementedError as err:
        raise NotImplementedError(f"{name!r}: {err}") from None
    if p.dim() == 0:
        return idx
    return local_indices(idx, tuple(p.shape), first_row, rows)


def is_sharded(model: nn.Module) -> bool:
    return any(is_dtensor(p) for p in model.parameters())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on CPU; a collective on sharded models (every rank calls it),
    empty on ranks other than 0."""
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def global_rank() -> int:
    """This process's global rank: torch.distributed's when initialised, else Lightning's (from the
    launcher's environment), else 0."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def is_distributed() -> bool:
    """torch.distributed is initialised with more than one rank."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def all_ranks_true(flag: bool) -> bool:
    """Logical AND over ranks (just ``flag`` without torch.distributed)."""
    if not is_distributed():
        return flag
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    t = torch.tensor([0 if flag else 1], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(t)
    return int(t.item()) == 0


# -- data sharding with marked padding ---------------------------------------------------------------

def pad_shard_indices(n: int, rank: int, world_size: int) -> list[tuple[int, bool]]:
    """This rank's share of ``n`` items as ``(index, is_padding)`` pairs: ``range(rank, n, world_size)``
    then repeats of the first items, marked ``is_padding``, so that every rank gets
    ``ceil(n / world_size)`` items and runs the same number of batches (DDP all-reduces and FSDP2
    all-gathers in every step, so ranks must stay in step). Every item appears exactly once unmarked
    over all ranks, so results that skip (or give zero weight to) the padding count each item once;
    ``torch.utils.data.DistributedSampler`` instead pads with unmarked repeats.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad rank {rank} of world size {world_size}")
    if world_size == 1:
        return [(i, False) for i in range(n)]
    per_rank = -(-n // world_size)
    own = [(i, False) for i in range(rank, n, world_size)]
    return own + [(i % n, True) for i in range(per_rank - len(own))]


class PreShardedSampler(DistributedSampler):
    """Walks a list that is already this rank's shard, in order.

    It subclasses DistributedSampler only so that Lightning does not wrap the loader in a second
    (duplicating) DistributedSampler: the shard is made with :func:`pad_shard_indices` (or the
    evaluation's ``shard_records``), whose padding is marked, so every item counts exactly once.
    """

    def __init__(self, dataset: Sequence) -> None:
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=False, drop_last=False)
