#!/usr/bin/env python
"""Packed against padded training batches: time and peak memory of SET steps on real data.

Both methods run the same SET step on the same batches: SparseAdamW over a random 1% of the
decoder matrices (``prepare_model``: only those matrices get gradients), zero_grad, loss, backward,
step. They differ in the loss only:

  padded   the model's own loss on the data module's right-padded batch (every padding token
           computed, the output layer and log-softmax over the vocabulary at every position);
  packed   :func:`lit_safety.modules.base.packed_lm_loss`, what ``pack_sequences: true`` trains
           with: the batch's sequences in one row without padding, the output layer only where
           the next token is supervised.

Batches come from :class:`~lit_safety.data.datamodules.RefusalDataModule` exactly as SET builds
them (refusal pairs, optionally mixed with benign instruction -> answer pairs), so the padding and
the share of supervised tokens are the data's own; the script prints both. Each method runs in a
fresh subprocess (``lit_safety.benchmarking.run_workers``, glibc's mmap threshold fixed so RSS
follows live memory); peak memory is VmHWM over the RSS after the model, mask and batches were
made. Before timing, the parent checks on the first batch that both losses agree.

    python scripts/bench_packing.py                     # SmolLM2, circuit-breakers refusals
    python scripts/bench_packing.py --benign-data outputs/smollm2-self-answers/samples.jsonl --benign-ratio 0.9
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from lit_safety.benchmarking import MALLOC_ENV, add_method_arguments, cpu_facts, malloc_trim, methods_or_work, \
    peak_bytes, reset_peak, rss_bytes, run_config, run_workers
from lit_safety.data.datamodules import RefusalDataModule
from lit_safety.esi.selection import SelectionConfig, select_weights
from lit_safety.io import write_json
from lit_safety.models.loading import load_model
from lit_safety.modules.base import packed_lm_loss
from lit_safety.optim import SparseAdamW, prepare_model

METHODS = ("padded", "packed")


def loss_of(method: str, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return packed_lm_loss(model, batch) if method == "packed" else model(**batch).loss


def batches_of(args: argparse.Namespace) -> list[dict[str, torch.Tensor]]:
    data = RefusalDataModule(tokenizer=args.model, data_path=args.data, benign_path=args.benign_data,
                             benign_ratio=args.benign_ratio, num_samples=2000, batch_size=args.batch_size,
                             max_length=args.max_length, val_fraction=0.0, seed=args.seed)
    data.setup("fit")
    loader = iter(data.train_dataloader())
    return [next(loader) for _ in range(args.warmup + args.steps)]


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    model = load_model(args.model).train()
    mask = select_weights(model, None, SelectionConfig(method="random", ratio=args.ratio, seed=args.seed))
    prepare_model(model, mask)
    optimizer = SparseAdamW(model, mask, lr=args.lr)
    batches = batches_of(args)
    malloc_trim()
    baseline = rss_bytes()
    reset_ok = reset_peak()
    times, losses = [], []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(args.worker, model, batch)
        loss.backward()
        optimizer.step()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    write_json(Path(args.result), {"times_s": times, "time_median_s": statistics.median(times), "losses": losses,
                                   "peak_extra_mib": (peak_bytes(reset_ok) - baseline) / 2**20})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="builtin model name, HF directory or .gguf")
    p.add_argument("--data", default="../shared/data/refusals/circuit_breakers_train.json",
                   help="refusal pairs (RefusalDataModule's data_path)")
    p.add_argument("--benign-data", default=None, help="benign instruction -> answer pairs mixed in (benign_path)")
    p.add_argument("--benign-ratio", type=float, default=0.0, help="share of benign pairs (with --benign-data)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--ratio", type=float, default=0.01, help="share of the decoder weights trained (random)")
    p.add_argument("--lr", type=float, default=2.5e-3)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    add_method_arguments(p, METHODS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    methods = methods_or_work(args, worker, METHODS)
    torch.set_num_threads(args.threads)
    batches = batches_of(args)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    cells = sum(b["input_ids"].numel() for b in batches)
    supervised = sum(int((b["labels"] != -100).sum()) for b in batches)
    model = load_model(args.model).train()
    with torch.no_grad():
        padded, packed = (float(loss_of(m, model, batches[0])) for m in METHODS)
    del model
    facts = cpu_facts()
    cpu = facts["model"]
    bf16 = "native bf16" if facts["bf16_units"] else "no native bf16"
    print(f"{args.model} on {cpu} ({bf16}), {args.threads} threads; batch {args.batch_size} x {args.max_length}: "
          f"{tokens / cells:.0%} of the padded batches' cells are tokens, {supervised / cells:.0%} supervised; "
          f"first batch's loss padded {padded:.6f}, packed {packed:.6f}", flush=True)
    rows = {}
    for method, result in run_workers(__file__, methods, argv, env={**os.environ, **MALLOC_ENV}):
        rows[method] = json.loads(Path(result).read_text())
        print(f"  {method}: median step {rows[method]['time_median_s']:.2f} s, "
              f"peak +{rows[method]['peak_extra_mib']:.0f} MiB", flush=True)
    if set(METHODS) <= set(rows):
        speed = rows["padded"]["time_median_s"] / rows["packed"]["time_median_s"]
        memory = rows["packed"]["peak_extra_mib"] / rows["padded"]["peak_extra_mib"]
        print(f"packed: {speed:.2f}x faster per step, {memory:.2f}x the peak memory of padded")
    if args.out:
        write_json(args.out, {"config": run_config(args), "cpu": cpu, "bf16": bf16, "token_share": tokens / cells,
                              "supervised_share": supervised / cells, "first_loss": {"padded": padded, "packed": packed},
                              "results": rows})


if __name__ == "__main__":
    main()
