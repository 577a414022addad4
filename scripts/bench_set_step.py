#!/usr/bin/env python
"""Benchmark one SET training step (SparseAdamW) against dense baselines on a random Llama.

Model: randomly initialised LlamaForCausalLM (defaults: hidden 768, 12 layers, MLP 2048,
12 heads, vocab 32000, untied LM head -> ~134M float32 parameters). Mask: a random 1% of the
entries of every decoder weight matrix (``model.layers.*`` 2-D weights; the mask's scope), as
sorted flat indices. Batch: random token ids, labels = inputs.

Methods (one training step = zero_grad, forward, backward, optimizer step):
  set           SparseAdamW after prepare_model (only masked matrices get gradients; O(k) state).
  set_backward  same, step_in_backward=True: each matrix is updated in its post-accumulate-grad
                hook and its gradient freed at once.
  masked_dense  the reference approach: dense torch AdamW (full state) over the mask's
                matrices, a dense bool mask per matrix, the unselected gradient entries zeroed
                before the step and the unselected values restored after it from a dense
                snapshot of the original weights (needed because weight decay moves them).
                Matrices outside the mask's scope are frozen (requires_grad False), which is
                the cheapest form of this baseline.
  full          plain full fine-tuning: dense torch AdamW over all parameters.

Memory: every method runs in a FRESH subprocess (``lit_safety.benchmarking.run_workers``, with
MALLOC_MMAP_THRESHOLD_=1 MiB, so freed tensors go back to the OS and RSS follows live memory).
Baseline = RSS right after the model, the sparse mask and the batch were created and ``malloc_trim(0)`` ran (a tiny warm-up model ran
once before, so code pages and thread pools are not billed to the method). "extra" = peak - baseline, where peak is
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` at the end (lifetime peak; the model creation
peak is below the training peak) and, as a cross-check, VmHWM after resetting it via
/proc/self/clear_refs where the kernel allows. Time: median over the timed steps after warm-up
steps (the first steps allocate the dense optimizers' state).

Targets: SET state <= 2% of dense AdamW state (elements m+v vs masked_dense, same matrices);
SET peak extra memory <= 0.45x masked_dense; SET step time <= 1.0x full fine-tuning.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import time
from pathlib import Path

import torch

from lit_safety.benchmarking import (
    MALLOC_ENV,
    add_method_arguments,
    malloc_trim,
    methods_or_work,
    reset_peak,
    run_config,
    run_workers,
    status_kb,
)
from lit_safety.esi.mask import SafetyMask
from lit_safety.optim import SparseAdamW, prepare_model

METHODS = ("set", "set_backward", "masked_dense", "full")
SMALL = dict(hidden=256, layers=4, intermediate=688, heads=4, vocab=8000, seq=64)


# ------------------------------------------------------------------------------ model & mask
def build_model(hidden: int, layers: int, intermediate: int, heads: int, vocab: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=2048, tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    model.train()
    return model


def random_mask(model: torch.nn.Module, ratio: float, seed: int) -> SafetyMask:
    """``ratio`` of the entries of every decoder weight matrix, as sorted unique flat indices."""
    g = torch.Generator().manual_seed(seed)
    indices, shapes = {}, {}
    for name, p in model.named_parameters():
        if name.startswith("model.layers.") and p.dim() == 2:
            shapes[name] = tuple(p.shape)
            k = max(1, round(ratio * p.numel()))
            indices[name] = torch.randperm(p.numel(), generator=g)[:k].sort().values
    return SafetyMask(indices=indices, shapes=shapes, metadata={"model": "random llama", "ratio": ratio})


# ---------------------------------------------------------------------------------- methods
class Method:
    """setup() builds the optimizer (billed to the method); step() is one training step."""

    def __init__(self, model, mask: SafetyMask, args: argparse.Namespace) -> None:
        self.model, self.mask, self.args = model, mask, args
        self.aux_bytes = 0  # dense masks / snapshots the method keeps besides optimizer state

    def setup(self) -> None:
        raise NotImplementedError

    def step(self, batch: torch.Tensor) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = self.model(input_ids=batch, labels=batch).loss
        loss.backward()
        self.before_step()
        self.opt.step()
        self.after_step()
        return float(loss.detach())

    def before_step(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def state_numel_bytes(self) -> tuple[int, int]:
        numel = nbytes = 0
        for state in self.opt.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                numel += state[key].numel()
                nbytes += state[key].nbytes
        return numel, nbytes


class SetMethod(Method):
    step_in_backward = False

    def setup(self) -> None:
        prepare_model(self.model, self.mask)
        self.opt = SparseAdamW(self.model, self.mask, lr=self.args.lr, weight_decay=self.args.weight_decay,
                               step_in_backward=self.step_in_backward)

    def state_numel_bytes(self) -> tuple[int, int]:
        return self.opt.state_numel(), self.opt.state_nbytes(include_indices=False)


class SetBackwardMethod(SetMethod):
    step_in_backward = True


class MaskedDenseMethod(Method):
    def setup(self) -> None:
        named = dict(self.model.named_parameters())
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.masks: dict[str, torch.Tensor] = {}
        self.snapshot: dict[str, torch.Tensor] = {}
        for name in self.mask.shapes:
            named[name].requires_grad_(True)
            self.masks[name] = self.mask.bool_mask(name)
            self.snapshot[name] = named[name].detach().clone()
        self.params = {name: named[name] for name in self.mask.shapes}
        self.aux_bytes = sum(m.nbytes for m in self.masks.values()) + sum(s.nbytes for s in self.snapshot.values())
        self.opt = torch.optim.AdamW(self.params.values(), lr=self.args.lr, weight_decay=self.args.weight_decay)

    @torch.no_grad()
    def before_step(self) -> None:
        for name, p in self.params.items():
            p.grad.mul_(self.masks[name])

    @torch.no_grad()
    def after_step(self) -> None:
        for name, p in self.params.items():
            p.copy_(torch.where(self.masks[name], p, self.snapshot[name]))


class FullMethod(Method):
    def setup(self) -> None:
        for p in self.model.parameters():
            p.requires_grad_(True)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=self.args.lr, weight_decay=self.args.weight_decay)


RUNNERS = {"set": SetMethod, "set_backward": SetBackwardMethod, "masked_dense": MaskedDenseMethod, "full": FullMethod}


# ----------------------------------------------------------------------------------- worker
def model_kwargs(args: argparse.Namespace) -> dict[str, int]:
    return dict(hidden=args.hidden, layers=args.layers, intermediate=args.intermediate, heads=args.heads,
                vocab=args.vocab)


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    # Warm-up on a tiny model: load kernels/code pages and thread pools before the baseline.
    tiny = build_model(64, 1, 128, 2, 128, seed=0)
    tiny_mask = random_mask(tiny, args.ratio, seed=0)
    warm = RUNNERS[args.worker](tiny, tiny_mask, args)
    warm.setup()
    warm.step(torch.randint(0, 128, (1, 16)))
    del warm, tiny, tiny_mask
    gc.collect()

    model = build_model(**model_kwargs(args), seed=args.seed)
    mask = random_mask(model, args.ratio, seed=args.seed + 1)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(args.seed))
    gc.collect()
    malloc_trim()
    baseline = status_kb("VmRSS") * 1024
    hwm_reset = reset_peak()

    method = RUNNERS[args.worker](model, mask, args)
    method.setup()
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        losses.append(method.step(batch))
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    hwm = status_kb("VmHWM") * 1024 if hwm_reset else None
    numel, nbytes = method.state_numel_bytes()
    result = {
        "method": args.worker,
        "n_params": sum(p.numel() for p in model.parameters()),
        "n_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "k": mask.k,
        "state_numel": numel,
        "state_bytes": nbytes,
        "aux_bytes": method.aux_bytes,
        "grad_bytes": sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad),
        "baseline_mib": baseline / 2**20,
        "peak_extra_mib": (maxrss - baseline) / 2**20,
        "peak_extra_hwm_mib": (hwm - baseline) / 2**20 if hwm is not None else None,
        "times_s": times,
        "time_median_s": statistics.median(times),
        "losses": losses,
    }
    Path(args.result).write_text(json.dumps(result))


# ----------------------------------------------------------------------------------- parent
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--small", action="store_true",
                   help="quick check: " + ", ".join(f"{k}={v}" for k, v in SMALL.items()))
    p.add_argument("--ratio", type=float, default=0.01, help="selected fraction of each decoder matrix")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (dense state is allocated here)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=1, help="torch threads in each worker")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    add_method_arguments(p, METHODS)
    args = p.parse_args(argv)
    if args.small:
        for key, value in SMALL.items():
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    methods = methods_or_work(args, worker, METHODS)
    print(f"Llama hidden={args.hidden} layers={args.layers} intermediate={args.intermediate} vocab={args.vocab}, "
          f"batch={args.batch}x{args.seq}, ratio={args.ratio}, threads={args.threads}, "
          f"{args.warmup} warm-up + {args.steps} timed steps", flush=True)
    rows: dict[str, dict] = {}
    for m, res in run_workers(__file__, methods, argv, env={**os.environ, **MALLOC_ENV}):
        rows[m] = json.loads(Path(res).read_text())
        print(f"  {m}: median step {rows[m]['time_median_s']:.3f} s, extra {rows[m]['peak_extra_mib']:.0f} MiB",
              flush=True)

    first = next(iter(rows.values()))
    print(f"\nN = {first['n_params']:,} parameters, k = {first['k']:,} selected "
          f"({100 * first['k'] / first['n_params']:.2f}% of N)")
    head = (f"{'method':<13} {'trainable':>12} {'state elems':>12} {'state MiB':>10} {'aux MiB':>8} "
            f"{'extra MiB':>10} {'(VmHWM)':>8} {'step s':>7} {'loss 1st->last':>16}")
    print(head + "\n" + "-" * len(head))
    for m, r in rows.items():
        hwm = f"{r['peak_extra_hwm_mib']:.0f}" if r["peak_extra_hwm_mib"] is not None else "n/a"
        print(f"{m:<13} {r['n_trainable']:>12,} {r['state_numel']:>12,} {r['state_bytes'] / 2**20:>10.1f} "
              f"{r['aux_bytes'] / 2**20:>8.1f} {r['peak_extra_mib']:>10.0f} {hwm:>8} {r['time_median_s']:>7.3f} "
              f"{r['losses'][0]:>7.4f}->{r['losses'][-1]:.4f}")
    print("state = AdamW moments (m+v); SET also keeps the mask's int64 indices "
          f"({first['k'] * 8 / 2**20:.1f} MiB, shared with the mask); aux = dense bool masks + weight snapshot")

    targets = {}
    for s in ("set", "set_backward"):
        if s not in rows:
            continue
        r = rows[s]
        if "masked_dense" in rows:
            d = rows["masked_dense"]
            targets[f"{s}_state_vs_dense_adamw"] = (r["state_numel"] / d["state_numel"], 0.02)
            targets[f"{s}_extra_mem_vs_masked_dense"] = (r["peak_extra_mib"] / d["peak_extra_mib"], 0.45)
        if "full" in rows:
            targets[f"{s}_step_time_vs_full"] = (r["time_median_s"] / rows["full"]["time_median_s"], 1.0)
    if targets:
        print("\ntargets:")
        for name, (ratio, limit) in targets.items():
            print(f"  {name:<40} {ratio:8.4f}  (<= {limit})  {'MET' if ratio <= limit else 'NOT MET'}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "config": run_config(args),
            "torch": torch.__version__,
            "results": rows,
            "targets": {k: {"ratio": v[0], "limit": v[1], "met": v[0] <= v[1]} for k, v in targets.items()},
        }
        args.out.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
