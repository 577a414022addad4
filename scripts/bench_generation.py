"""Evaluation generation throughput (prompts/s) at several batch sizes, on one model.

Greedy decoding of a fixed number of new tokens (``--max-new-tokens``) for the organism's held-out
harmful prompts through the same ``generate_responses`` the evaluation uses; each batch size runs
after one warm-up batch, and the speed-up is the ratio to batch size 1 in the same process.

    python scripts/bench_generation.py --model organism-dense-aligned --batch-sizes 1 8 32
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lit_safety.evaluation.suite import load_suite
from lit_safety.generation import generate_responses
from lit_safety.models.loading import load_model_and_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="organism-dense-aligned")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("-n", type=int, default=64, help="prompts per batch size")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.model)
    prompts = [r.prompt for r in load_suite(num_harmful=args.n, benign_data=None, task_data=None).records["harmful"]]
    results = []
    for batch_size in args.batch_sizes:
        generate_responses(model, tokenizer, prompts[:batch_size], batch_size=batch_size,
                           max_new_tokens=args.max_new_tokens)  # warm-up
        start = time.perf_counter()
        responses = generate_responses(model, tokenizer, prompts, batch_size=batch_size,
                                       max_new_tokens=args.max_new_tokens)
        seconds = time.perf_counter() - start
        words = sum(len(r.split()) for r in responses)
        results.append({"batch_size": batch_size, "prompts": len(prompts), "seconds": seconds,
                        "prompts_per_s": len(prompts) / seconds, "words_per_s": words / seconds})
    base = results[0]["prompts_per_s"]
    print(f"{args.model}: {len(prompts)} prompts, {args.max_new_tokens} new tokens max, {args.threads} threads")
    print(f"{'batch':>5} {'prompts/s':>10} {'speed-up':>9}")
    for r in results:
        r["speedup_vs_first"] = r["prompts_per_s"] / base
        print(f"{r['batch_size']:>5} {r['prompts_per_s']:>10.1f} {r['speedup_vs_first']:>8.1f}x")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": args.model, "results": results}, indent=2))


if __name__ == "__main__":
    main()
