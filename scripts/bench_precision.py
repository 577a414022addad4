#!/usr/bin/env python
"""Organism training step: float32 vs bf16 autocast on this CPU (why organisms build in float32).

One training step (forward, backward, AdamW) of the dense organism's shape (Llama, 4 layers, hidden
128, vocab 3000, 1.5M parameters; the MoE shape with ``--arch moe``) at batch 32 x 64 tokens, in the
two precisions ``OrganismSpec.precision`` allows, each in a fresh process (peak RSS per mode).
Prints the CPU's bf16 flags, seconds per step and the bf16/float32 ratio.

    python scripts/bench_precision.py
    # emulate a CPU without bf16 units on one that has them (AVX2 kernels in ATen, MKL and oneDNN):
    ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 python scripts/bench_precision.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from lit_safety.benchmarking import MALLOC_ENV, cpu_facts, peak_bytes, reset_peak, rss_bytes
from lit_safety.organism.training import new_model, training_autocast
from lit_safety.organism.specs import PRESETS

def measure(precision: str, arch: str, steps: int) -> dict[str, float]:
    """Seconds per training step (after 2 warm-up steps) and peak RSS, in this process."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    spec = PRESETS["default"][arch].replace(precision=precision)

    class Vocab:  # new_model reads the tokenizer's size and special ids only
        bos_token_id, eos_token_id, pad_token_id = 0, 1, 2

        def __len__(self) -> int:
            return spec.vocab_size

    torch.manual_seed(0)
    model = new_model(spec, Vocab()).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(3, spec.vocab_size, (32, 64))
    baseline, ok = rss_bytes(), reset_peak()

    def step() -> None:
        with training_autocast(spec):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return {"seconds_per_step": (time.perf_counter() - start) / steps,
            "peak_extra_mib": (peak_bytes(ok) - baseline) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["dense", "moe"], default="dense")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per precision (after 2 warm-up steps)")
    parser.add_argument("--child", choices=["float32", "bf16-mixed"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.arch, args.steps)))
        return
    results = {}
    for precision in ("float32", "bf16-mixed"):
        out = subprocess.run([sys.executable, __file__, "--child", precision, "--arch", args.arch,
                              "--steps", str(args.steps)], env={**os.environ, **MALLOC_ENV},
                             capture_output=True, text=True, check=True)
        results[precision] = json.loads(out.stdout.strip().splitlines()[-1])
    cpu = cpu_facts()
    emulated = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")
                if k in os.environ}
    print(f"CPU: {cpu['model']}; avx2={cpu['avx2']} avx512f={cpu['avx512f']} bf16 units: "
          f"{', '.join(cpu['bf16_units']) or 'none'}" + (f"; ISA limited by {emulated}" if emulated else ""))
    print(f"{args.arch} organism step, batch 32 x 64, 2 threads:")
    for precision, r in results.items():
        print(f"  {precision:>10}: {r['seconds_per_step']:.3f} s/step, peak +{r['peak_extra_mib']:.0f} MiB")
    ratio = results["bf16-mixed"]["seconds_per_step"] / results["float32"]["seconds_per_step"]
    print(f"  bf16-mixed / float32 time: {ratio:.2f}x")


if __name__ == "__main__":
    main()
