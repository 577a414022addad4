"""Tests for lit_safety.esi.topk: exactness vs. a stable-sort reference, scopes, errors,
and a 2-process gloo run of the sharded selection."""

from __future__ import annotations

import math
import os
import tempfile
import time
import zlib
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port

from lit_safety.esi.topk import TopKResult, k_from_ratio, select_topk

# ------------------------------------------------------------------------------ helpers


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """These tensors are tiny, so intra-op threads gain nothing; on a busy 2-core box the
    OpenMP barriers of the 2**15/2**16-bin histogram ops made them ~40x slower."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)


SHAPES = [(37,), (8, 13), (3, 5, 7), (1,), (64, 3), (2, 1, 9)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
KINDS = ["abs_normal", "ties", "zeros", "equal", "denormal", "same_high_bits", "mixed"]


def make_scores(kind: str, seed: int, shapes=SHAPES, dtypes=DTYPES) -> dict[str, torch.Tensor]:
    """Random dict of non-negative score tensors of varied shapes/dtypes with many ties."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, shape in enumerate(shapes):
        dtype = dtypes[i % len(dtypes)]
        if kind == "abs_normal":
            x = torch.randn(shape, generator=g).abs()
        elif kind == "ties":
            x = torch.randint(0, 4, shape, generator=g).float()
        elif kind == "zeros":
            x = torch.randn(shape, generator=g).abs() * (torch.rand(shape, generator=g) < 0.05)
        elif kind == "equal":
            x = torch.full(shape, 0.5)
        elif kind == "denormal":  # float32 denormals and zeros (bf16/fp16 turn them into 0)
            x = torch.randint(0, 6, shape, generator=g).float() * 1e-45
        elif kind == "same_high_bits":  # all in one high-16-bit bin: exercises pass 2
            bits = torch.randint(0, 12, shape, generator=g, dtype=torch.int32) + 0x3F800000
            x = bits.view(torch.float32)
        else:  # mixed magnitudes with duplicates
            x = torch.randint(0, 3, shape, generator=g).float() * 10.0 ** torch.randint(-3, 3, shape, generator=g)
        out[f"t{i}"] = x.to(dtype)
    return out


def concat(scores) -> torch.Tensor:
    return torch.cat([t.float().reshape(-1) for t in scores.values()])


def stable_top(x: torch.Tensor, k: int) -> torch.Tensor:
    """Reference: positions of a stable descending sort cut after k, ascending."""
    return torch.sort(x, descending=True, stable=True)[1][:k].sort().values


def split_by_tensor(scores, flat_idx: torch.Tensor) -> dict[str, torch.Tensor]:
    out, off = {}, 0
    for name, t in scores.items():
        sel = flat_idx[(flat_idx >= off) & (flat_idx < off + t.numel())] - off
        if sel.numel():
            out[name] = sel
        off += t.numel()
    return out


def ref_global(scores, k):
    return split_by_tensor(scores, stable_top(concat(scores), k))


def ref_per_tensor(scores, ratio=None, k=None):
    out = {}
    for name, t in scores.items():
        if t.numel():
            k_t = k if k is not None else k_from_ratio(ratio, t.numel())
            out[name] = stable_top(t.float().reshape(-1), k_t)
    return out


def ref_per_row(scores, ratio=None, k=None):
    out = {}
    for name, t in scores.items():
        if t.numel() == 0:
            continue
        rows = t.float().reshape(-1, t.shape[-1]) if t.dim() else t.float().reshape(1, 1)
        k_r = k if k is not None else k_from_ratio(ratio, rows.shape[1])
        cols = torch.sort(rows, dim=1, descending=True, stable=True)[1][:, :k_r]
        flat = (cols + torch.arange(rows.shape[0])[:, None] * rows.shape[1]).reshape(-1)
        out[name] = flat.sort().values
    return out


def assert_same(got: dict, want: dict) -> None:
    assert list(got) == [n for n in want if want[n].numel()], (list(got), list(want))
    for name, idx in got.items():
        assert idx.dtype == torch.int64
        assert torch.equal(idx, want[name]), name


# ------------------------------------------------------------------------------ global


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk_size", [29, None])
def test_global_matches_stable_sort(kind, chunk_size):
    # zlib.crc32, not hash(): str hashes change with PYTHONHASHSEED, so the data would differ per run
    scores = make_scores(kind, seed=zlib.crc32(kind.encode()) % 1000)
    cat = concat(scores)
    n = cat.numel()
    for k in sorted({1, 2, max(1, n // 100), n // 10, n // 2, n - 1, n}):
        res = select_topk(scores, k=k, chunk_size=chunk_size)
        assert isinstance(res, TopKResult) and res.k == k and res.n == n
        assert_same(res.indices, ref_global(scores, k))
        got_vals = torch.cat([scores[m].float().reshape(-1)[i] for m, i in res.indices.items()])
        assert torch.equal(got_vals.sort().values, torch.topk(cat, k).values.sort().values)
        assert res.threshold == float(torch.topk(cat, k).values.min())
        assert res.num_local() == k


@pytest.mark.parametrize("kind", KINDS)
def test_global_three_digit_radix(kind, monkeypatch):
    """The CUDA digit layout (11/10/10 bits), exercised on CPU."""
    import lit_safety.esi.topk as topk_mod

    monkeypatch.setattr(topk_mod, "_DIGITS_CPU", topk_mod._DIGITS_CUDA)
    scores = make_scores(kind, seed=21)
    n = concat(scores).numel()
    for k in sorted({1, max(1, n // 100), n // 3, n}):
        assert_same(select_topk(scores, k=k, chunk_size=50).indices, ref_global(scores, k))
        assert_same(
            select_topk(scores, ratio=0.3, scope="per_tensor").indices, ref_per_tensor(scores, ratio=0.3)
        )


def test_global_ratio_and_large_random():
    g = torch.Generator().manual_seed(1)
    scores = {
        "embed": torch.randn(500, 64, generator=g).abs(),
        "q": torch.randint(0, 50, (64, 64), generator=g).float(),
        "norm": torch.ones(64),
        "mlp": torch.randn(4, 64, 96, generator=g).abs().to(torch.bfloat16),
    }
    n = concat(scores).numel()
    for ratio in (1e-6, 0.01, 0.137, 0.5, 1.0):
        k = k_from_ratio(ratio, n)
        res = select_topk(scores, ratio=ratio, chunk_size=4096)
        assert res.k == k
        assert_same(res.indices, ref_global(scores, k))


def test_noncontiguous_negative_zero_and_inf():
    base = torch.tensor([[0.0, -0.0, 3.0], [-0.0, 0.0, math.inf], [1e-40, 0.0, -0.0]])
    scores = {"t": base.t(), "u": torch.tensor([-0.0, 0.0, 2.0, math.inf])}
    assert not scores["t"].is_contiguous()
    n = 13
    for k in range(1, n + 1):
        assert_same(select_topk(scores, k=k, chunk_size=2).indices, ref_global(scores, k))
    assert select_topk(scores, k=1).threshold == math.inf


def test_all_zero_and_single_element():
    scores = {"a": torch.zeros(5), "b": torch.zeros(()), "c": torch.zeros(0, 3)}
    res = select_topk(scores, k=3)
    assert_same(res.indices, {"a": torch.tensor([0, 1, 2])})
    assert res.threshold == 0.0
    res = select_topk({"s": torch.tensor(2.5)}, ratio=1.0)
    assert_same(res.indices, {"s": torch.tensor([0])})


def test_world_one_sharded_mode_is_identity():
    scores = make_scores("ties", seed=3)
    res = select_topk(
        scores,
        k=40,
        offsets={n: 0 for n in scores},
        full_numel={n: t.numel() for n, t in scores.items()},
    )
    assert_same(res.indices, ref_global(scores, 40))


# ------------------------------------------------------------------------- other scopes


@pytest.mark.parametrize("kind", ["abs_normal", "ties", "equal", "zeros", "same_high_bits"])
def test_per_tensor(kind):
    scores = make_scores(kind, seed=7)
    for ratio in (1e-9, 0.01, 0.3, 1.0):
        res = select_topk(scores, ratio=ratio, scope="per_tensor", chunk_size=5)
        assert_same(res.indices, ref_per_tensor(scores, ratio=ratio))
        assert res.k == sum(k_from_ratio(ratio, t.numel()) for t in scores.values())
        assert res.n == concat(scores).numel()
    res = select_topk(scores, k=1, scope="per_tensor")
    assert_same(res.indices, ref_per_tensor(scores, k=1))
    with pytest.raises(ValueError, match="exceeds"):
        select_topk(scores, k=2, scope="per_tensor")  # t3 has a single element


@pytest.mark.parametrize("kind", ["abs_normal", "ties", "equal", "zeros", "denormal"])
def test_per_row(kind):
    scores = make_scores(kind, seed=11)
    scores["scalar"] = torch.tensor(1.0)
    for ratio in (0.01, 0.2, 0.5, 1.0):
        res = select_topk(scores, ratio=ratio, scope="per_row", chunk_size=20)
        assert_same(res.indices, ref_per_row(scores, ratio=ratio))
    res = select_topk({"w": scores["t1"], "e": scores["t2"]}, k=3, scope="per_row")
    assert_same(res.indices, ref_per_row({"w": scores["t1"], "e": scores["t2"]}, k=3))
    assert res.k == 3 * 8 + 3 * 15
    with pytest.raises(ValueError, match="exceeds"):
        select_topk(scores, k=2, scope="per_row")  # t3 rows have length 1


# ------------------------------------------------------------------------------ errors


def test_k_from_ratio():
    assert k_from_ratio(0.01, 100) == 1
    assert k_from_ratio(1e-9, 100) == 1
    assert k_from_ratio(0.025, 100) == 3  # round half up (banker's rounding would give 2)
    assert k_from_ratio(0.015, 100) == 2
    assert k_from_ratio(1.0, 7) == 7
    with pytest.raises(ValueError):
        k_from_ratio(0.5, 0)


def test_argument_errors():
    s = {"a": torch.rand(10), "b": torch.rand(3, 4)}
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="ratio"):
            select_topk(s, ratio=bad)
    with pytest.raises(ValueError, match="k must be >= 1"):
        select_topk(s, k=0)
    with pytest.raises(ValueError, match="exceeds"):
        select_topk(s, k=23)
    with pytest.raises(ValueError, match="exactly one"):
        select_topk(s)
    with pytest.raises(ValueError, match="exactly one"):
        select_topk(s, ratio=0.1, k=2)
    with pytest.raises(ValueError, match="unknown scope"):
        select_topk(s, k=1, scope="per_layer")
    with pytest.raises(TypeError, match="k must be an int"):
        select_topk(s, k=2.0)
    with pytest.raises(TypeError, match="float64"):
        select_topk({"a": torch.rand(3, dtype=torch.float64)}, k=1)
    with pytest.raises(ValueError, match="non-empty"):
        select_topk({}, k=1)
    with pytest.raises(ValueError, match="empty"):
        select_topk({"e": torch.zeros(0)}, k=1)


@pytest.mark.parametrize("scope", ["global", "per_tensor", "per_row"])
def test_invalid_scores_name_the_tensor(scope):
    ok = torch.rand(4, 4)
    with pytest.raises(ValueError, match=r"'bad'.*NaN"):
        select_topk({"ok": ok, "bad": torch.tensor([[1.0, float("nan")]])}, k=1, scope=scope)
    with pytest.raises(ValueError, match=r"'neg'.*negative"):
        select_topk({"ok": ok, "neg": torch.tensor([[0.5, -1e-3]])}, k=1, scope=scope)
    with pytest.raises(ValueError, match=r"'neg'.*negative"):  # negative denormal
        select_topk({"neg": torch.tensor([[-1e-45, 1.0]])}, k=1, scope=scope)


def test_sharded_argument_errors():
    s = {"a": torch.rand(10)}
    with pytest.raises(ValueError, match="group"):
        select_topk(s, k=1, group=object())
    with pytest.raises(ValueError, match="both"):
        select_topk(s, k=1, offsets={"a": 0})
    with pytest.raises(ValueError, match="keys must match"):
        select_topk(s, k=1, offsets={"b": 0}, full_numel={"a": 10})
    with pytest.raises(ValueError, match="cover 10 of 20"):  # the other half has no owner
        select_topk(s, k=1, offsets={"a": 0}, full_numel={"a": 20})
    with pytest.raises(ValueError, match="does not fit"):
        select_topk(s, k=1, offsets={"a": 5}, full_numel={"a": 10})
    with pytest.raises(NotImplementedError, match="per_row"):
        select_topk(s, k=1, scope="per_row", offsets={"a": 0}, full_numel={"a": 10})


# ------------------------------------------------------------------ 2-process (gloo)

# Fraction of each tensor's flat range owned by the *first* shard, and whether rank 0
# owns the first (True) or the second shard (False: rank order != global order).
SPLITS = [(0.5, True), (0.31, False), (0.0, True), (1.0, False), (0.77, True), (0.12, False)]


def _shard(scores, rank):
    local, offsets, full = {}, {}, {}
    for i, (name, t) in enumerate(scores.items()):
        frac, rank0_first = SPLITS[i % len(SPLITS)]
        flat = t.reshape(-1)
        cut = int(round(frac * flat.numel()))
        first = rank == (0 if rank0_first else 1)
        lo, hi = (0, cut) if first else (cut, flat.numel())
        local[name], offsets[name], full[name] = flat[lo:hi].clone(), lo, flat.numel()
    return local, offsets, full


def _dist_cases():
    cases = []
    for kind in ("abs_normal", "ties", "equal", "zeros", "same_high_bits"):
        scores = make_scores(kind, seed=5)
        n = concat(scores).numel()
        for k in sorted({1, max(1, n // 100), n // 3, n}):
            cases.append((f"{kind}/global/k={k}", scores, dict(k=k)))
        cases.append((f"{kind}/per_tensor", scores, dict(ratio=0.3, scope="per_tensor")))
    return cases


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=30)
    )
    try:
        results = {}
        for name, scores, kwargs in _dist_cases():
            local, offsets, full = _shard(scores, rank)
            res = select_topk(local, offsets=offsets, full_numel=full, chunk_size=16, **kwargs)
            results[name] = (res.indices, res.k, res.n, res.threshold)
        # Invalid scores on one rank only: both ranks must raise, not hang.
        scores = {"a": torch.rand(8), "b": torch.rand(8)}
        if rank == 1:
            scores["b"][3] = float("nan")
        try:
            select_topk(scores, k=2, offsets={"a": 8 * rank, "b": 8 * rank}, full_numel={"a": 16, "b": 16})
            results["nan_error"] = None
        except ValueError as exc:
            results["nan_error"] = str(exc)
        try:
            select_topk(scores, k=1, scope="per_row", offsets={"a": 0, "b": 0}, full_numel={"a": 8, "b": 8})
        except NotImplementedError:
            results["per_row"] = "NotImplementedError"
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()



@pytest.mark.slow
def test_two_process_gloo_matches_single_process():
    world = 2
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.spawn(_worker, args=(world, free_port(), out_dir), nprocs=world, join=False)
        deadline = time.monotonic() + 50
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail("distributed workers timed out")
        per_rank = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]

    for name, scores, kwargs in _dist_cases():
        single = select_topk(scores, **kwargs)
        union: dict[str, list[torch.Tensor]] = {}
        for r in range(world):
            indices, k, n, thr = per_rank[r][name]
            assert (k, n, thr) == (single.k, single.n, single.threshold), name
            for t, idx in indices.items():
                union.setdefault(t, []).append(idx)
        merged = {t: torch.cat(v).sort().values for t, v in union.items()}
        for t, v in merged.items():
            assert v.unique().numel() == v.numel(), (name, t)  # ranks never overlap
        assert_same({t: merged[t] for t in scores if t in merged}, single.indices)

    assert "NaN" in per_rank[1]["nan_error"] and "'b'" in per_rank[1]["nan_error"]
    assert "another rank" in per_rank[0]["nan_error"]
    assert per_rank[0]["per_row"] == per_rank[1]["per_row"] == "NotImplementedError"


# --------------------------------------------------------------------------- CUDA


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("scope", ["global", "per_tensor", "per_row"])
def test_cuda_matches_cpu(scope):
    for kind in KINDS:
        scores = make_scores(kind, seed=2)
        on_gpu = {n: t.cuda() for n, t in scores.items()}
        for kwargs in (dict(k=1), dict(ratio=0.05), dict(ratio=1.0)):
            for chunk_size in (64, None):
                got = select_topk(on_gpu, scope=scope, chunk_size=chunk_size, **kwargs)
                want = select_topk(scores, scope=scope, **kwargs)
                assert all(idx.device.type == "cuda" for idx in got.indices.values())
                assert_same({n: i.cpu() for n, i in got.indices.items()}, want.indices)
                assert (got.k, got.n, got.threshold) == (want.k, want.n, want.threshold)


@needs_cuda
def test_cuda_large_global():
    g = torch.Generator().manual_seed(0)
    scores = {
        "a": torch.randn(3000, 1000, generator=g).abs(),
        "b": torch.randint(0, 1000, (2, 1500, 700), generator=g).float().to(torch.bfloat16),
        "c": torch.zeros(1 << 20),
    }
    on_gpu = {n: t.cuda() for n, t in scores.items()}
    for ratio in (0.001, 0.01, 0.3):
        got = select_topk(on_gpu, ratio=ratio)
        assert_same({n: i.cpu() for n, i in got.indices.items()}, ref_global(scores, got.k))


def _nccl_worker(rank: int, port: int, out_dir: str) -> None:
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        scores = {n: t.cuda() for n, t in make_scores("ties", seed=9).items()}
        res = select_topk(
            scores,
            k=50,
            offsets={n: 0 for n in scores},
            full_numel={n: t.numel() for n, t in scores.items()},
        )
        torch.save({n: i.cpu() for n, i in res.indices.items()}, os.path.join(out_dir, "nccl.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@needs_cuda
def test_nccl_single_rank_sharded_mode():
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_nccl_worker, args=(free_port(), out_dir), nprocs=1, join=True)
        got = torch.load(os.path.join(out_dir, "nccl.pt"))
    assert_same(got, ref_global(make_scores("ties", seed=9), 50))
