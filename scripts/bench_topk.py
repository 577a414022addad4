#!/usr/bin/env python
"""Benchmark exact radix top-k (lit_safety.esi.topk) against two baselines.

Methods (all global scope, same k = max(1, round(ratio * N))):
  ours        select_topk(scores, ratio=...): histogram radix select, streamed in chunks.
  torch_topk  (a) torch.topk(torch.cat([flattened scores]), k, sorted=False).
  sampling    (b) the reference sampling threshold: sample 1% of the scores, threshold at
              the (1 - 2*ratio) quantile of the sample, gather the candidates >= threshold,
              torch.topk among the candidates.

Scores are |randn| float32 tensors shaped like a small Llama (defaults: 12 layers, hidden
768, MLP 3072, vocab 32000 with tied embeddings -> ~138M scores, 551 MB).

Memory (CPU): every method runs in a FRESH subprocess. The subprocess creates the scores, runs
the method once on a tiny input (so lazily loaded code pages and thread pools are not
billed to it), then records RSS as the baseline and resets the kernel's peak-RSS counter
(write "5" to /proc/self/clear_refs, which resets VmHWM). After the timed runs, peak
extra memory = VmHWM - baseline. It includes the method's output (the k selected
indices). If clear_refs is unavailable, the lifetime peak (ru_maxrss) is used instead and
the table says so (scores are created in place, so this is still close).
Memory (--device cuda): torch.cuda.max_memory_allocated() minus the allocation after the
scores were created (exact for the caching allocator).

Exactness is checked in the parent against (a): identical index set, and identical
multiset of selected values (ties may be broken differently by torch.topk).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from lit_safety.benchmarking import add_method_arguments, methods_or_work, reset_peak, run_config, run_workers, status_kb
from lit_safety.esi.topk import k_from_ratio, select_topk

METHODS = ("ours", "torch_topk", "sampling")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------ scores


def llama_shapes(layers: int, hidden: int, intermediate: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a Llama-style decoder (tied embeddings)."""
    shapes: dict[str, tuple[int, ...]] = {}
    if vocab:
        shapes["model.embed_tokens.weight"] = (vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (hidden, hidden)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        shapes[p + "mlp.gate_proj.weight"] = (intermediate, hidden)
        shapes[p + "mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, intermediate)
    shapes["model.norm.weight"] = (hidden,)
    return shapes


def make_scores(
    shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, seed: int, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """|randn| scores, generated in place (no temporaries of model size)."""
    g = torch.Generator(device=device).manual_seed(seed)
    scores = {}
    for name, shape in shapes.items():
        t = torch.empty(shape, dtype=torch.float32, device=device).normal_(generator=g).abs_()
        scores[name] = t if dtype == torch.float32 else t.to(dtype)
    return scores


# ----------------------------------------------------------------------------- methods


def offsets_of(scores: dict[str, torch.Tensor]) -> dict[str, int]:
    out, off = {}, 0
    for name, t in scores.items():
        out[name] = off
        off += t.numel()
    return out


# Each runner returns (raw result, converter to sorted global concatenation indices).
# Only the runner call is timed and memory-measured; the conversion (for the exactness
# check) happens afterwards, so it is not billed to the method.


def run_ours(scores, ratio: float, chunk_size: int | None):
    res = select_topk(scores, ratio=ratio, chunk_size=chunk_size)

    def to_global() -> torch.Tensor:
        offs = offsets_of(scores)
        return torch.cat([idx + offs[name] for name, idx in res.indices.items()])

    return res, to_global


def run_torch_topk(scores, ratio: float, chunk_size: int | None):
    cat = torch.cat([t.reshape(-1).float() for t in scores.values()])
    k = k_from_ratio(ratio, cat.numel())
    idx = torch.topk(cat, k, sorted=False).indices
    return idx, lambda: idx


def run_sampling(scores, ratio: float, chunk_size: int | None, sample_frac: float = 0.01, margin: float = 2.0):
    """Reference approach: sampled quantile threshold, then exact topk among candidates."""
    n = sum(t.numel() for t in scores.values())
    k = k_from_ratio(ratio, n)
    device = next(iter(scores.values())).device
    g = torch.Generator(device=device).manual_seed(1234)
    sample = torch.cat(
        [
            t.reshape(-1)[
                torch.randint(t.numel(), (max(1, round(sample_frac * t.numel())),), generator=g, device=device)
            ].float()
            for t in scores.values()
        ]
    )
    thr = torch.quantile(sample, max(0.0, 1.0 - margin * ratio))
    vals, idx = [], []
    for off, t in zip(offsets_of(scores).values(), scores.values()):
        flat = t.reshape(-1)
        mask = flat >= thr
        vals.append(flat[mask].float())
        idx.append(torch.nonzero(mask).squeeze(1) + off)
    cand_vals, cand_idx = torch.cat(vals), torch.cat(idx)
    if cand_vals.numel() < k:  # threshold too high: the reference approach is not exact here
        print(f"[sampling] only {cand_vals.numel()} candidates for k={k}; result is incomplete", file=sys.stderr)
        return cand_idx, lambda: cand_idx
    sel = cand_idx[torch.topk(cand_vals, k, sorted=False).indices]
    return sel, lambda: sel


RUNNERS = {"ours": run_ours, "torch_topk": run_torch_topk, "sampling": run_sampling}


# ----------------------------------------------------------------------------- memory


# ------------------------------------------------------------------------------ worker


def worker(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    shapes = llama_shapes(args.layers, args.hidden, args.intermediate, args.vocab)
    scores = make_scores(shapes, DTYPES[args.dtype], args.seed, args.device)
    fn = RUNNERS[args.worker]
    small = make_scores(llama_shapes(1, 64, 128, 100), DTYPES[args.dtype], 0, args.device)
    fn(small, args.ratio, args.chunk_size)  # warm-up: code pages, thread pools, kernels
    del small
    gc.collect()
    sync()
    if cuda:  # the caching allocator's own peak counter is exact
        torch.cuda.empty_cache()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        peak_measure = "torch.cuda.max_memory_allocated"
    else:
        baseline = status_kb("VmRSS") * 1024
        peak_reset = reset_peak()
        peak_measure = "VmHWM after clear_refs" if peak_reset else "ru_maxrss (lifetime)"

    times, out = [], None
    for _ in range(args.repeats):
        out = None  # free the previous result first
        gc.collect()
        sync()
        t0 = time.perf_counter()
        out = fn(scores, args.ratio, args.chunk_size)
        sync()
        times.append(time.perf_counter() - t0)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    elif peak_reset:
        peak = status_kb("VmHWM") * 1024
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    assert out is not None
    sel = out[1]().sort().values
    offs = offsets_of(scores)
    vals = []
    for name, t in scores.items():  # values of the selection, gathered per tensor (no cat)
        lo, hi = offs[name], offs[name] + t.numel()
        part = sel[(sel >= lo) & (sel < hi)] - lo
        vals.append(t.reshape(-1)[part].float())
    flat_vals = torch.cat(vals).sort().values
    torch.save({"indices": sel.cpu(), "values": flat_vals.cpu()}, args.result + ".pt")
    with open(args.result, "w") as f:
        json.dump(
            {
                "times_s": times,
                "baseline_mib": baseline / 2**20,
                "peak_extra_mib": (peak - baseline) / 2**20,
                "peak_measure": peak_measure,
            },
            f,
        )


# ------------------------------------------------------------------------------ parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--intermediate", type=int, default=3072)
    p.add_argument("--vocab", type=int, default=32000, help="0 = no embedding matrix")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--ratio", type=float, default=0.01, help="fraction of all scores to select")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per method (median reported)")
    p.add_argument("--chunk-size", type=int, default=None, help="elements per chunk (ours; default: library's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (GPU memory = allocator peak)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    add_method_arguments(p, METHODS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    methods = methods_or_work(args, worker, METHODS)
    if "torch_topk" not in methods:
        methods.insert(0, "torch_topk")  # the reference for exactness and time ratios
    shapes = llama_shapes(args.layers, args.hidden, args.intermediate, args.vocab)
    n = sum(torch.Size(s).numel() for s in shapes.values())
    k = k_from_ratio(args.ratio, n)
    model_bytes = n * DTYPES[args.dtype].itemsize
    print(
        f"{len(shapes)} tensors, N={n:,} scores ({model_bytes / 2**20:.0f} MiB {args.dtype}), "
        f"ratio={args.ratio} -> k={k:,}, device={args.device}, threads={args.threads or torch.get_num_threads()}"
    )

    results: dict[str, dict] = {}
    outputs: dict[str, dict] = {}
    for m, res_path in run_workers(__file__, methods, argv):
        with open(res_path) as f:
            results[m] = json.load(f)
        outputs[m] = torch.load(res_path + ".pt")
        print(f"  {m}: done, median {statistics.median(results[m]['times_s']):.3f} s", flush=True)

    ref = outputs["torch_topk"]
    t_ref = statistics.median(results["torch_topk"]["times_s"])
    rows = []
    for m in methods:
        r, o = results[m], outputs[m]
        t = statistics.median(r["times_s"])
        r.update(
            method=m,
            time_median_s=t,
            time_ratio_vs_a=t / t_ref,
            extra_mem_ratio=r["peak_extra_mib"] * 2**20 / model_bytes,
            exact_set=bool(torch.equal(o["indices"], ref["indices"])),
            exact_values=bool(torch.equal(o["values"], ref["values"])),
            n_selected=int(o["indices"].numel()),
        )
        rows.append(r)

    head = (
        f"{'method':<11} {'exact set':>9} {'values':>6} {'time s':>8} {'t/t_a':>6} "
        f"{'extra MiB':>10} {'extra/model':>11}"
    )
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        print(
            f"{r['method']:<11} {str(r['exact_set']):>9} {str(r['exact_values']):>6} {r['time_median_s']:>8.3f} "
            f"{r['time_ratio_vs_a']:>6.2f} {r['peak_extra_mib']:>10.1f} {100 * r['extra_mem_ratio']:>10.2f}%"
        )
    print(f"(peak measured via {rows[0]['peak_measure']}; extra includes the k output indices "
          f"= {k * 8 / 2**20:.1f} MiB as int64)")
    if "ours" in results:
        o = results["ours"]
        ok = o["exact_set"] and o["extra_mem_ratio"] <= 0.05 and o["time_ratio_vs_a"] <= 1.5
        print(f"targets for ours (exact, extra <= 5% of scores, time <= 1.5x (a)): {'MET' if ok else 'NOT MET'}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "config": run_config(args),
            "n": n, "k": k, "model_bytes": model_bytes, "torch": torch.__version__, "results": rows,
        }
        args.out.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
