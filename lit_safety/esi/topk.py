"""Exact, memory-efficient top-k selection over a dict of per-parameter score tensors.

Expected-Safety-Impact scores exist for every weight of an LLM, so the total number of
scores ``N`` can reach billions. ``torch.topk(torch.cat(...))`` would double the memory
(a concatenated copy) and is slow on CPU; sampling a threshold is fast but not exact.

This module uses a *radix select* instead. For non-negative IEEE floats the order of the
values equals the order of their bit patterns read as (signed, here non-negative) int32,
so the k-th largest score can be located with two histogram passes:

1. histogram of the high 16 bits (sign is 0, so 2**15 bins) -> the bin holding the k-th
   largest entry and the number of entries in higher bins;
2. histogram of the low 16 bits of the entries in that bin -> the exact threshold bit
   pattern ``T`` and ``c_gt``, the number of entries strictly greater than ``T``
   (on CUDA three passes of 11/10/10 bits, which keep bincount in shared memory);
3. a selection pass keeps every entry ``> T`` plus the first ``k - c_gt`` entries ``== T``
   in concatenation order (tensor order of the dict, then flat index), which is exactly
   what a *stable* descending sort of the concatenation would pick.

Every pass streams over fixed-size chunks, so the extra memory is O(bins + k) plus a
chunk-sized temporary (bf16/fp16 chunks are upcast to float32, which is exact).

In the sharded setting (each rank owns a contiguous flat slice of every tensor) the two
histograms are all-reduced, so every rank finds the same global threshold, and the ties at
the threshold are split in *global* order from an all-gather of per-(tensor, rank) counts.
"""

from __future__ import annotations

import math
import numbers
import operator
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["SCOPES", "DEFAULT_CHUNK_SIZE", "DEFAULT_CHUNK_SIZE_CUDA", "TopKResult", "check_selection_size",
           "k_from_ratio", "select_topk"]

SCOPES = ("global", "per_tensor", "per_row")
"""Supported selection scopes, see :func:`select_topk`."""

DEFAULT_CHUNK_SIZE = 1 << 20
"""Elements streamed per step on CPU: ~6 bytes/element of scratch, i.e. ~6 MiB."""

DEFAULT_CHUNK_SIZE_CUDA = 1 << 24
"""On GPUs per-chunk launches/syncs dominate, so stream 16M elements (~100 MiB scratch)."""

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INF_BITS = 0x7F800000  # bit pattern of +inf; anything above is NaN
_ABS_MASK = 0x7FFFFFFF  # clears the sign bit (turns -0.0 into +0.0)
# Radix digits (shift, width), most significant first, covering the 31 non-sign bits.
# CPU: two histogram passes (2**15 and 2**16 bins; bincount is a cheap serial loop).
# CUDA: bincount only uses fast shared-memory atomics for a few thousand bins, so three
# passes of <= 2**11 bins beat two passes of 2**16 bins hammering global atomics.
_DIGITS_CPU = ((16, 15), (0, 16))
_DIGITS_CUDA = ((20, 11), (10, 10), (0, 10))


@dataclass
class TopKResult:
    """Result of :func:`select_topk`.

    Attributes:
        indices: parameter name -> ascending int64 *flat* indices of the selected entries
            (global flat indices into the full tensor when sharded). Only tensors with at
            least one selected entry on this rank appear.
        k: number of selected entries in total (over all tensors / rows and all ranks).
        n: number of scores the selection ran over (over all ranks).
        threshold: the smallest selected score (for ``"global"`` scope this is the exact
            k-th largest score; for the per-tensor / per-row scopes the minimum of the
            per-tensor / per-row k-th largest scores).
    """

    indices: dict[str, Tensor]
    k: int
    n: int
    threshold: float

    def num_local(self) -> int:
        """Number of entries selected on this rank."""
        return sum(int(idx.numel()) for idx in self.indices.values())


def k_from_ratio(ratio: float, n: int) -> int:
    """Number of entries to select for ``ratio`` of ``n`` scores.

    ``k = max(1, round(ratio * n))`` with round-half-up (not Python's banker's rounding),
    so any ratio in (0, 1] selects at least one and at most ``n`` entries.
    """
    ratio = _check_ratio(ratio)
    n = operator.index(n)
    if n < 1:
        raise ValueError(f"cannot select from n={n} scores; n must be >= 1")
    return min(n, max(1, math.floor(ratio * n + 0.5)))


def check_selection_size(shapes: Mapping[str, tuple[int, ...] | torch.Size], *, ratio: float | None = None,
                         k: int | None = None, scope: str = "global", what: str = "k") -> int:
    """Check, from the tensors' shapes alone, that :func:`select_topk` over scores of these shapes
    can select ``k`` (or ``ratio``) in ``scope``, before any score exists (before a gradient pass);
    returns N, the number of scores. A ``ValueError`` names ``what`` (the parameter, e.g.
    ``selection.k``), its value and the count it exceeds: all the scores (``global``), the smallest
    tensor (``per_tensor``) or the shortest row (``per_row``). Empty tensors are skipped, as in
    :func:`select_topk`.
    """
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; expected one of {SCOPES}")
    if (ratio is None) == (k is None):
        raise ValueError("pass exactly one of `ratio` or `k`")
    if ratio is not None:
        _check_ratio(ratio)
    else:
        k = _check_k(k)
    numels = {name: math.prod(shape) for name, shape in shapes.items()}
    n = sum(numels.values())
    if n < 1:
        raise ValueError(f"no scores to select from: the {len(numels)} tensors selected are all empty")
    if k is None:  # a ratio in (0, 1] selects between 1 and all of every non-empty unit
        return n
    if scope == "global":
        if k > n:
            raise ValueError(f"{what}={k} is more than the {n} weights the selection scores "
                             f"({len(numels)} tensors, scope 'global'); lower k or widen include/exclude")
        return n
    if scope == "per_tensor":
        name, smallest = min(((nm, c) for nm, c in numels.items() if c > 0), key=lambda item: item[1])
        if k > smallest:
            raise ValueError(f"{what}={k} is more than the {smallest} weights of {name!r} "
                             "(scope 'per_tensor' selects k from every tensor); lower k or use a ratio")
        return n
    rows = {nm: (int(shapes[nm][-1]) if len(shapes[nm]) else 1) for nm, c in numels.items() if c > 0}
    name, shortest = min(rows.items(), key=lambda item: item[1])
    if k > shortest:
        raise ValueError(f"{what}={k} is more than the {shortest} weights of a row of {name!r} "
                         "(scope 'per_row' selects k from every row); lower k or use a ratio")
    return n


def select_topk(
    scores: Mapping[str, Tensor],
    *,
    ratio: float | None = None,
    k: int | None = None,
    scope: str = "global",
    offsets: Mapping[str, int] | None = None,
    full_numel: Mapping[str, int] | None = None,
    group: dist.ProcessGroup | None = None,
    chunk_size: int | None = None,
) -> TopKResult:
    """Select the top-k scores exactly, with deterministic tie-breaking.

    The selection equals a stable descending sort of the concatenation of all flattened
    scores (in the mapping's order) cut after ``k`` entries: among equal scores, the entry
    earlier in the concatenation (earlier tensor, then lower flat index) wins.

    Args:
        scores: ordered mapping name -> non-negative float32/bf16/fp16 tensor (any shape,
            any device). NaN or negative scores raise ``ValueError``; -0.0 counts as 0.
        ratio: fraction in (0, 1] of the scope's ``N`` to select,
            ``k = max(1, round(ratio * N))`` (see :func:`k_from_ratio`).
        k: number of entries to select per scope unit (exactly one of ``ratio``/``k``).
        scope: ``"global"`` (top-k over all scores), ``"per_tensor"`` (top-k within each
            tensor; with ``k`` the same count per tensor) or ``"per_row"`` (top-k within
            each row ``t.reshape(-1, t.shape[-1])``: output rows of a 2-D ``[out, in]``
            weight, ``[e, i, :]`` of a 3-D ``[E, a, b]`` one, a 1-D tensor is one row).
            Empty tensors are skipped.
        offsets: sharded mode. Flat offset of each local tensor (a contiguous slice of the
            flattened full tensor) within the full tensor. Requires ``full_numel``.
        full_numel: sharded mode. Number of elements of each full tensor.
        group: process group for sharded mode (default: the default group when
            ``torch.distributed`` is initialised; when it is not, the one process must
            hold every full tensor). Passing ``group`` requires ``offsets``. Without
            ``offsets`` the call is purely local even if ``torch.distributed`` is
            initialised, i.e. every rank is assumed to hold complete scores.
        chunk_size: number of elements streamed per step (memory/speed trade-off);
            default :data:`DEFAULT_CHUNK_SIZE` on CPU, :data:`DEFAULT_CHUNK_SIZE_CUDA`
            when the first score tensor is on a GPU.

    Returns:
        A :class:`TopKResult`; when sharded each rank gets the *global* flat indices of
        its own selected entries and the union over ranks is the full selection.
    """
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; expected one of {SCOPES}")
    if (ratio is None) == (k is None):
        raise ValueError("pass exactly one of `ratio` or `k`")
    if ratio is not None:
        ratio = _check_ratio(ratio)
    if k is not None:
        k = _check_k(k)
    _check_scores(scores)
    if chunk_size is None:
        on_cpu = next(iter(scores.values())).device.type == "cpu"
        chunk_size = DEFAULT_CHUNK_SIZE if on_cpu else DEFAULT_CHUNK_SIZE_CUDA
    chunk_size = operator.index(chunk_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    sharded = offsets is not None or full_numel is not None or group is not None
    if scope == "per_row" and sharded:  # raised before any collective, on every rank
        raise NotImplementedError(
            "scope='per_row' is not supported for sharded scores (a flat shard may split rows); "
            "gather the rows of each tensor on one rank or use scope='global'/'per_tensor'"
        )
    if offsets is None and full_numel is None:
        if group is not None:
            raise ValueError("`group` given without `offsets`/`full_numel`: sharded mode needs both")
        segments = [_Segment(name, t, 0, t.numel(), i) for i, (name, t) in enumerate(scores.items())]
        comm = _Comm.local()
    else:
        segments, comm = _setup_sharded(scores, offsets, full_numel, group)

    if scope == "global":
        n = sum(s.full_numel for s in segments)
        k_sel = _resolve_k(ratio, k, n, what="all scores")
        indices, threshold = _select_global(segments, k_sel, comm, _Scratch(chunk_size))
        return TopKResult(indices, k_sel, n, threshold)
    if scope == "per_tensor":
        return _select_per_tensor(segments, ratio, k, comm, _Scratch(chunk_size))
    return _select_per_row(segments, ratio, k, chunk_size)


# --------------------------------------------------------------------------- validation


def _check_ratio(ratio: float) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise TypeError(f"ratio must be a real number, got {type(ratio).__name__}")
    ratio = float(ratio)
    if not (0.0 < ratio <= 1.0):  # also rejects NaN
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    return ratio


def _check_k(k: int) -> int:
    if isinstance(k, bool):
        raise TypeError("k must be an int, got bool")
    try:
        k = operator.index(k)
    except TypeError:
        raise TypeError(f"k must be an int, got {type(k).__name__}") from None
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return k


def _resolve_k(ratio: float | None, k: int | None, n: int, what: str) -> int:
    if n < 1:
        raise ValueError(f"no scores to select from ({what} are empty)")
    if ratio is not None:
        return k_from_ratio(ratio, n)
    assert k is not None
    if k > n:
        raise ValueError(f"k={k} exceeds the number of scores N={n} ({what})")
    return k


def _check_scores(scores: Mapping[str, Tensor]) -> None:
    if not isinstance(scores, Mapping) or len(scores) == 0:
        raise ValueError("scores must be a non-empty mapping name -> tensor")
    for name, t in scores.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"scores[{name!r}] is a {type(t).__name__}, expected a torch.Tensor")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(
                f"scores[{name!r}] has dtype {t.dtype}; supported: float32, bfloat16, float16"
            )


def _raise_if_invalid(name: str, values: Tensor) -> None:
    """Raise a ValueError naming the tensor if ``values`` (float32) has NaN or negatives."""
    if bool(torch.isnan(values).any()):
        raise ValueError(f"scores[{name!r}] contains NaN; scores must be non-negative")
    if bool((values < 0).any()):
        raise ValueError(
            f"scores[{name!r}] contains negative values (min {float(values.min()):g}); "
            "scores must be non-negative"
        )


# ------------------------------------------------------------------------ communication


class _Comm:
    """Minimal collective wrapper; the world-size-1 instance makes every op a no-op."""

    def __init__(self, group: dist.ProcessGroup | None, world: int, rank: int, device: torch.device | None):
        self.group = group
        self.world = world
        self.rank = rank
        self.device = device  # device for collective tensors; None = caller's choice
        self.layout: Tensor | None = None  # sharded: [world, n_tensors, (offset, numel, full)]

    @classmethod
    def local(cls) -> _Comm:
        return cls(None, 1, 0, None)

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def all_gather(self, t: Tensor) -> Tensor:
        """Stack ``t`` from every rank -> shape ``[world, *t.shape]``."""
        if self.world == 1:
            return t.unsqueeze(0)
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t.contiguous(), group=self.group)
        return torch.stack(out)


def _comm_device(group: dist.ProcessGroup | None, fallback: torch.device) -> torch.device:
    backend = str(dist.get_backend(group))
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo":
        return torch.device("cpu")
    return fallback  # e.g. "cpu:gloo,cuda:nccl": the scores' own device works


@dataclass
class _Segment:
    """One local tensor (or shard) plus where it sits in the full tensor."""

    name: str
    tensor: Tensor
    offset: int  # global flat offset of this shard's first element
    full_numel: int  # numel of the full (unsharded) tensor
    index: int  # position in the scores mapping (column of the sharded layout)
    clear_sign: bool = False  # set in pass 1 if the shard holds -0.0 (negative bit pattern)


def _setup_sharded(
    scores: Mapping[str, Tensor],
    offsets: Mapping[str, int] | None,
    full_numel: Mapping[str, int] | None,
    group: dist.ProcessGroup | None,
) -> tuple[list[_Segment], _Comm]:
    """Validate the shard layout on every rank and build segments + communicator.

    Ranks must pass the same tensor names in the same order, and for every tensor the
    non-empty shards must tile ``[0, full_numel)`` exactly (checked via all-gather).
    A layout error on one rank is shared so that every rank raises instead of hanging.
    """
    if offsets is None or full_numel is None:
        raise ValueError("sharded mode needs both `offsets` and `full_numel`")
    if group is not None and not (dist.is_available() and dist.is_initialized()):
        raise ValueError("`group` given but torch.distributed is not initialised")
    names = list(scores)
    first_device = next(iter(scores.values())).device
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        comm = _Comm(group, world, rank, _comm_device(group, first_device))
    else:
        comm = _Comm.local()
    device = comm.device or first_device

    error: str | None = None
    segments: list[_Segment] = []
    for what, mapping in (("offsets", offsets), ("full_numel", full_numel)):
        if error is None and set(mapping) != set(names):
            missing = sorted(set(names) - set(mapping))
            extra = sorted(set(mapping) - set(names))
            error = f"`{what}` keys must match scores (missing {missing}, extra {extra})"
    for i, name in enumerate(names if error is None else ()):
        off, full, t = operator.index(offsets[name]), operator.index(full_numel[name]), scores[name]
        if off < 0 or full < 0 or off + t.numel() > full:
            error = f"shard of {name!r} (offset {off}, numel {t.numel()}) does not fit in full_numel {full}"
            break
        segments.append(_Segment(name, t, off, full, i))

    # Same names in the same order on every rank (a shape mismatch would hang all_gather).
    digest = zlib.crc32("\0".join(names).encode()) & 0x7FFFFFFF
    header = torch.tensor([len(names), digest, int(error is not None)], dtype=torch.int64, device=device)
    header = comm.all_gather(header).cpu()
    if error is not None:
        raise ValueError(error)
    if bool(header[:, 2].any()):
        raise ValueError("invalid shard layout on another rank (see its error)")
    if not bool((header[:, :2] == header[0, :2]).all()):
        raise ValueError("all ranks must pass the same score names in the same order")

    meta = [[s.offset, s.tensor.numel(), s.full_numel] for s in segments]
    layout = comm.all_gather(torch.tensor(meta, dtype=torch.int64, device=device)).cpu()
    for seg in segments:  # layout: [world, n_tensors, (offset, numel, full_numel)]
        per_rank = layout[:, seg.index]
        if not bool((per_rank[:, 2] == seg.full_numel).all()):
            raise ValueError(f"ranks disagree on full_numel[{seg.name!r}]: {per_rank[:, 2].tolist()}")
        covered = 0
        for off, numel, _ in sorted(per_rank.tolist()):
            if numel == 0:
                continue
            if off != covered:
                raise ValueError(
                    f"shards of {seg.name!r} must tile [0, {seg.full_numel}) contiguously; "
                    f"expected a shard at offset {covered}, found one at {off}"
                )
            covered += numel
        if covered != seg.full_numel:
            raise ValueError(f"shards of {seg.name!r} cover {covered} of {seg.full_numel} elements")
    comm.layout = layout
    return segments, comm


# ---------------------------------------------------------------------- radix selection


class _Scratch:
    """Chunk-sized buffers reused by every pass (one set per device).

    Reusing them keeps the allocator from accumulating freed chunk-sized blocks, so the
    extra memory really is ~6 bytes x ``chunk_size`` plus the output.
    """

    def __init__(self, chunk_size: int):
        self.chunk_size = chunk_size
        self._buffers: dict[tuple[str, torch.device, torch.dtype], Tensor] = {}

    def get(self, role: str, n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (role, device, dtype)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = torch.empty(self.chunk_size, dtype=dtype, device=device)
        return buf[:n]


def _iter_bits(seg: _Segment, scratch: _Scratch, validate: bool = False) -> Iterator[tuple[int, Tensor]]:
    """Yield ``(start, int32 bit patterns)`` of consecutive flat chunks of a segment.

    bf16/fp16 are upcast per chunk (exact). With ``validate`` (pass 1) NaN/negative
    scores raise and -0.0 is detected, after which its sign bit is cleared in every pass:
    as an int its pattern would otherwise rank below every positive score.
    The yielded tensor may be a scratch buffer: it is only valid until the next step.
    """
    flat = seg.tensor.reshape(-1)  # a view for contiguous tensors
    for start in range(0, flat.numel(), scratch.chunk_size):
        chunk = flat[start : start + scratch.chunk_size]
        n, device = chunk.numel(), chunk.device
        if chunk.dtype != torch.float32:
            chunk = scratch.get("bits", n, device, torch.int32).view(torch.float32).copy_(chunk)
        bits = chunk.view(torch.int32)
        if validate:
            lo, hi = torch.aminmax(bits)
            if bool((lo < 0) | (hi > _INF_BITS)):
                _raise_if_invalid(seg.name, chunk)
                seg.clear_sign = True  # only -0.0 left
        if seg.clear_sign:  # never modify the caller's tensor: write into scratch
            bits = torch.bitwise_and(bits, _ABS_MASK, out=scratch.get("bits", n, device, torch.int32))
        yield start, bits


def _shift(bits: Tensor, shift: int, scratch: _Scratch) -> Tensor:
    out = scratch.get("shift", bits.numel(), bits.device, torch.int32)
    return torch.bitwise_right_shift(bits, shift, out=out)


def _mask(op, bits: Tensor, value: int, scratch: _Scratch) -> Tensor:
    return op(bits, value, out=scratch.get("mask", bits.numel(), bits.device, torch.bool))


def _locate(hist: Tensor, k: int) -> tuple[int, int]:
    """Return the bin holding the k-th largest entry and the count in higher bins."""
    hist = hist.cpu()
    suffix = hist.flip(0).cumsum(0).flip(0)  # suffix[b] = #entries in bins >= b
    b = int(torch.nonzero(suffix >= k).max())
    return b, int(suffix[b] - hist[b])


def _find_threshold(
    segments: list[_Segment], k: int, comm: _Comm, scratch: _Scratch
) -> tuple[int, int, int]:
    """Radix select -> (threshold bits T, #entries > T, #entries == T), all global.

    Each pass histograms one digit of the entries that share the already-known higher
    digits (the prefix) and all-reduces it; the digit holding the k-th largest entry is
    appended to the prefix. After the last digit the prefix is the exact bit pattern.
    """
    device = comm.device or segments[0].tensor.device
    digits = _DIGITS_CPU if segments[0].tensor.device.type == "cpu" else _DIGITS_CUDA
    prefix = above = 0
    for level, (shift, width) in enumerate(digits):
        n_bins = 1 << width
        # One extra slot flags invalid scores, so that every rank raises instead of hanging.
        hist = torch.zeros(n_bins + 1, dtype=torch.int64, device=device)
        error: ValueError | None = None
        try:
            for seg in segments:
                for _, bits in _iter_bits(seg, scratch, validate=level == 0):
                    if level == 0:  # bits >> shift < n_bins for every valid score
                        digit = _shift(bits, shift, scratch)
                    else:
                        in_prefix = _mask(torch.eq, _shift(bits, shift + width, scratch), prefix, scratch)
                        digit = bits[in_prefix].bitwise_right_shift_(shift).bitwise_and_(n_bins - 1)
                    hist[:n_bins] += torch.bincount(digit, minlength=n_bins).to(device)
        except ValueError as exc:
            if comm.world == 1:
                raise
            error = exc
            hist[n_bins] = 1
        hist = comm.all_reduce_sum(hist)
        if error is not None:
            raise error
        if int(hist[n_bins]):
            raise ValueError("scores on another rank contain NaN or negative values (see its error)")
        digit_value, above_digit = _locate(hist[:n_bins], k - above)
        prefix = (prefix << width) | digit_value
        above += above_digit
    return prefix, above, int(hist[digit_value])


def _extract(seg: _Segment, thr: int, quota: int | None, scratch: _Scratch) -> tuple[Tensor, int]:
    """Local flat indices of entries > thr plus the first ``quota`` entries == thr.

    ``quota=None`` keeps every tie. Returns (ascending indices, number of ties kept).
    """
    pieces: list[Tensor] = []
    taken = 0
    for start, bits in _iter_bits(seg, scratch):
        idx = torch.nonzero(_mask(torch.ge, bits, thr, scratch)).squeeze(1)
        if idx.numel() == 0:
            continue
        if quota is not None:
            is_eq = bits[idx] == thr
            n_eq = int(is_eq.sum())
            room = quota - taken
            if n_eq > room:
                idx = idx[~is_eq | (is_eq.cumsum(0) <= room)]
                n_eq = room
            taken += n_eq
        pieces.append(idx.add_(start))
    if not pieces:
        return torch.empty(0, dtype=torch.int64, device=seg.tensor.device), taken
    return (pieces[0] if len(pieces) == 1 else torch.cat(pieces)), taken


def _count_equal(seg: _Segment, thr: int, scratch: _Scratch) -> int:
    return sum(int(_mask(torch.eq, bits, thr, scratch).sum()) for _, bits in _iter_bits(seg, scratch))


def _bits_to_float(bits: int) -> float:
    return torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()


def _select_global(
    segments: list[_Segment], k: int, comm: _Comm, scratch: _Scratch
) -> tuple[dict[str, Tensor], float]:
    """Exact top-k over the concatenation of ``segments`` (sharded if ``comm.world > 1``)."""
    thr, c_gt, n_eq = _find_threshold(segments, k, comm, scratch)
    ties_left = k - c_gt  # 1 <= ties_left <= n_eq

    # quotas[i]: how many ties segment i keeps (None = all of them).
    quotas: list[int | None] = [None] * len(segments)
    sequential = comm.world == 1 and ties_left < n_eq  # allocate on the fly, in order
    if comm.world > 1 and ties_left < n_eq:
        # Ties are split in GLOBAL order: tensor order, then by shard offset within a tensor.
        device = comm.device or segments[0].tensor.device
        local = torch.tensor([_count_equal(s, thr, scratch) for s in segments], dtype=torch.int64, device=device)
        counts = comm.all_gather(local).cpu()  # [world, n_segments]
        layout = comm.layout
        assert layout is not None
        for i, seg in enumerate(segments):
            for r in sorted(range(comm.world), key=lambda r: int(layout[r, seg.index, 0])):
                q = min(ties_left, int(counts[r, i]))
                ties_left -= q
                if r == comm.rank:
                    quotas[i] = q

    indices: dict[str, Tensor] = {}
    for i, seg in enumerate(segments):
        if sequential:
            idx, taken = _extract(seg, thr, ties_left, scratch)
            ties_left -= taken
        else:
            idx, _ = _extract(seg, thr, quotas[i], scratch)
        if idx.numel():
            indices[seg.name] = idx.add_(seg.offset) if seg.offset else idx
    return indices, _bits_to_float(thr)


# ------------------------------------------------------------------- per-unit scopes


def _select_per_tensor(
    segments: list[_Segment], ratio: float | None, k: int | None, comm: _Comm, scratch: _Scratch
) -> TopKResult:
    """Run the exact global selection independently on every (non-empty) tensor."""
    indices: dict[str, Tensor] = {}
    total_k = total_n = 0
    threshold = math.inf
    for seg in segments:
        if seg.full_numel == 0:
            continue
        k_t = _resolve_k(ratio, k, seg.full_numel, what=f"tensor {seg.name!r}")
        idx, thr = _select_global([seg], k_t, comm, scratch)
        indices.update(idx)
        total_k += k_t
        total_n += seg.full_numel
        threshold = min(threshold, thr)
    if total_n == 0:
        raise ValueError("no scores to select from (all tensors are empty)")
    return TopKResult(indices, total_k, total_n, threshold)


def _select_per_row(
    segments: list[_Segment], ratio: float | None, k: int | None, chunk_size: int
) -> TopKResult:
    """Top-k within every row ``t.reshape(-1, t.shape[-1])``, ties to the lower column.

    Rows are processed in blocks of about ``chunk_size`` elements: ``torch.topk`` gives
    each row's k-th largest value ``T``; then keep ``> T`` plus the first ``k - #(> T)``
    entries ``== T`` of the row (cumsum over the tie mask).
    """
    indices: dict[str, Tensor] = {}
    total_k = total_n = 0
    threshold = math.inf
    for seg in segments:
        t = seg.tensor
        if t.numel() == 0:
            continue
        rows = t.reshape(-1, t.shape[-1]) if t.dim() > 0 else t.reshape(1, 1)
        n_rows, length = rows.shape
        k_row = _resolve_k(ratio, k, length, what=f"a row of tensor {seg.name!r}")
        block = max(1, chunk_size // length)
        pieces = []
        for r0 in range(0, n_rows, block):
            x = rows[r0 : r0 + block].float()
            lo, hi = torch.aminmax(x.view(torch.int32))
            if bool((lo < 0) | (hi > _INF_BITS)):
                _raise_if_invalid(seg.name, x)
            kth = torch.topk(x, k_row, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
            gt = x > kth
            eq = x == kth
            room = k_row - gt.sum(dim=1, keepdim=True)
            keep = gt | (eq & (eq.cumsum(dim=1) <= room))
            pieces.append(torch.nonzero(keep.reshape(-1)).squeeze(1) + r0 * length)
            threshold = min(threshold, float(kth.min()))
        indices[seg.name] = torch.cat(pieces)
        total_k += k_row * n_rows
        total_n += t.numel()
    if total_n == 0:
        raise ValueError("no scores to select from (all tensors are empty)")
    return TopKResult(indices, total_k, total_n, threshold)
