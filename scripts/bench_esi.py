#!/usr/bin/env python
"""ESI scoring cost: throughput against a bare forward+backward, peak memory, and scaling with size.

Model: randomly initialised LlamaForCausalLM at each ``--sizes`` preset (~25M, ~100M, ~400M
float32 parameters). Batches: ``--batches`` x ``--batch-size`` random token sequences of
``--seq`` tokens whose second half is the "response" (labels set there), i.e. the layout of the
refusal objective's batches.

Per size, two modes, each in a FRESH subprocess (memory probes in ``lit_safety.benchmarking``):

  bare  the floor any gradient-based score pays: for each batch, forward, the same per-example
        response log-likelihood, ``sum().backward()`` into the same scored weights (every decoder
        weight matrix; embeddings, norms and LM head frozen as ESI does by default).
  esi   the selection pipeline (``WeightSelector``, what ``compute_safety_mask`` runs): the same
        passes accumulated, then in ``select()`` the mean, ESI = |sigma(W) * grad| in place and the
        exact top-1% selection into a SafetyMask (radix select), gradients released.

Reported: gradient-pass throughput ratio esi/bare (target >= 0.9x) and the end-to-end ratio
including selection; peak RSS over the baseline (model loaded, batches built) and the total peak
(weights + grads + activations [+ selection]) of esi vs bare (target: < 5% more); and time of the
gradient pass and of the selection per size (roughly linear in the parameter count is the goal).

    python scripts/bench_esi.py --sizes 25M 100M 400M --out outputs/bench_esi.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lit_safety.benchmarking import MALLOC_ENV, malloc_trim, peak_bytes, reset_peak, rss_bytes
from lit_safety.esi.objectives import response_log_likelihood
from lit_safety.esi.scoring import ParameterFilter
from lit_safety.esi.selection import SelectionConfig, WeightSelector, select_weights

ESI_TOP_1 = SelectionConfig(method="esi", ratio=0.01, objective="refusal")

SIZES = {  # hidden, layers, intermediate, heads, vocab
    "tiny": (64, 2, 172, 4, 1000),
    "25M": (384, 6, 1024, 6, 16000),
    "100M": (768, 12, 2048, 12, 16000),
    "400M": (1152, 22, 3072, 16, 16000),
}


def build_model(size: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, intermediate, heads, vocab = SIZES[size]
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=1024, tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def make_batches(vocab: int, n: int, batch_size: int, seq: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch_size, seq), generator=g)
        labels = torch.full_like(ids, -100)
        labels[:, seq // 2:] = ids[:, seq // 2:]
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return batches


def worker(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    # Warm up code paths and thread pools on a tiny model so they are not billed to the mode.
    warm = build_model("tiny")
    select_weights(warm, make_batches(1000, 1, 2, 16), ESI_TOP_1)
    del warm
    model = build_model(args.size)
    model.eval()
    params = ParameterFilter().select(model)
    batches = make_batches(model.config.vocab_size, args.batches, args.batch_size, args.seq)
    n_examples = args.batches * args.batch_size
    malloc_trim()
    baseline = rss_bytes()
    reset_ok = reset_peak()
    start = time.perf_counter()
    selection_seconds = 0.0
    if args.mode == "bare":
        scored = {id(p) for p in params.values()}
        for p in model.parameters():
            p.requires_grad_(id(p) in scored)
        for batch in batches:
            response_log_likelihood(model, batch).sum().backward()
        grad_seconds = time.perf_counter() - start
    else:
        with WeightSelector(model, ESI_TOP_1) as selector:
            for batch in batches:
                selector.accumulate(batch)
            grad_seconds = time.perf_counter() - start
            t = time.perf_counter()
            mask = selector.select()  # scores + exact top-k
            selection_seconds = time.perf_counter() - t
        assert mask.k == round(0.01 * mask.n)
    peak = peak_bytes(reset_ok)
    n_params = sum(p.numel() for p in model.parameters())
    return {"size": args.size, "mode": args.mode, "params": n_params,
            "scored_params": sum(p.numel() for p in params.values()), "examples": n_examples,
            "grad_seconds": grad_seconds, "selection_seconds": selection_seconds,
            "baseline_mib": baseline / 2**20, "peak_mib": peak / 2**20, "extra_mib": (peak - baseline) / 2**20,
            "peak_measure": "VmHWM after clear_refs" if reset_ok else "ru_maxrss (lifetime)"}


def run_mode(size: str, mode: str, args: argparse.Namespace) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = handle.name
    cmd = [sys.executable, __file__, "--worker", "--size", size, "--mode", mode, "--batches", str(args.batches),
           "--batch-size", str(args.batch_size), "--seq", str(args.seq), "--threads", str(args.threads),
           "--worker-out", out]
    subprocess.run(cmd, check=True, env={**os.environ, **MALLOC_ENV})
    result = json.loads(Path(out).read_text())
    os.unlink(out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["25M", "100M", "400M"], choices=list(SIZES))
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", default="tiny", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="esi", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        Path(args.worker_out).write_text(json.dumps(worker(args)))
        return
    rows = []
    print(f"{'size':>5} {'params':>8} {'bare s':>7} {'esi s':>7} {'grad x':>7} {'select s':>8} {'e2e x':>6} "
          f"{'bare peak':>9} {'esi peak':>9} {'peak +%':>7}")
    for size in args.sizes:
        bare, esi = run_mode(size, "bare", args), run_mode(size, "esi", args)
        row = {"size": size, "params": bare["params"], "bare": bare, "esi": esi,
               "grad_throughput_ratio": bare["grad_seconds"] / esi["grad_seconds"],
               "end_to_end_throughput_ratio": bare["grad_seconds"] / (esi["grad_seconds"] + esi["selection_seconds"]),
               "peak_total_ratio": esi["peak_mib"] / bare["peak_mib"]}
        rows.append(row)
        print(f"{size:>5} {bare['params'] / 1e6:>7.1f}M {bare['grad_seconds']:>7.2f} {esi['grad_seconds']:>7.2f} "
              f"{row['grad_throughput_ratio']:>6.2f}x {esi['selection_seconds']:>8.2f} "
              f"{row['end_to_end_throughput_ratio']:>5.2f}x {bare['peak_mib']:>8.0f}M {esi['peak_mib']:>8.0f}M "
              f"{100 * (row['peak_total_ratio'] - 1):>+6.1f}%")
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        scale = last["params"] / first["params"]
        print(f"scaling {first['size']} -> {last['size']} ({scale:.1f}x parameters): gradient pass "
              f"{last['esi']['grad_seconds'] / first['esi']['grad_seconds']:.1f}x time, selection "
              f"{last['esi']['selection_seconds'] / max(first['esi']['selection_seconds'], 1e-9):.1f}x time")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"settings": {k: v for k, v in vars(args).items() if k != "out"}, "rows": rows},
                                       indent=2, default=str))


if __name__ == "__main__":
    main()
