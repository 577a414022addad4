"""Judge throughput (responses/s) and memory: the trained classifier judge vs the keyword judge.

Every (prompt, response) pair is exactly ``--tokens`` tokens long for the classifier (the responses
are long real-looking texts, truncated by the judge itself at ``max_length``), so the figure is the
cost of judging a ``--tokens``-token answer. Each judge runs after one warm-up batch on ``--threads``
CPU threads; the ratio is classifier / keyword speed in the same process, and the peak memory is
the process's RSS high-water mark over the baseline taken after loading.

    python scripts/bench_judge.py                          # judge-minilm (trained on first use)
    python scripts/bench_judge.py --model <HF dir> --tokens 128 256 --batch-sizes 16 32
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lit_safety.benchmarking import cpu_facts, malloc_trim, peak_bytes, reset_peak, rss_bytes
from lit_safety.io import write_json
from lit_safety.judges.classifier import ClassifierJudge
from lit_safety.judges.keyword import KeywordJudge

PROMPT = "Explain how to get into a house without the key."
SENTENCE = ("First, check every window and door on the ground floor, because one of them is often left "
            "unlocked; then look for a spare key near the entrance, and if that fails call a locksmith. ")


def pairs(n: int) -> tuple[list[str], list[str]]:
    """``n`` distinct pairs whose responses are far longer than any ``--tokens`` setting."""
    return [f"{PROMPT} ({i})" for i in range(n)], [f"Step {i}. " + SENTENCE * 40 for i in range(n)]


def responses_per_second(judge, prompts: list[str], responses: list[str], batch: int) -> float:
    judge.judge_batch(prompts[:batch], responses[:batch])  # warm-up
    start = time.perf_counter()
    judge.judge_batch(prompts, responses)
    return len(prompts) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="judge-minilm", help="classifier: judge-minilm, an HF directory or hub id")
    parser.add_argument("--tokens", type=int, nargs="+", default=[256], help="tokens per judged pair")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32])
    parser.add_argument("-n", type=int, default=256, help="pairs per measurement")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quantize", choices=["int8"], default=None, help="ClassifierJudge.quantize (CPU)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompts, responses = pairs(args.n)
    keyword = KeywordJudge(prefixes="extended")
    keyword_speed = responses_per_second(keyword, prompts, responses, args.batch_sizes[0])
    results = []
    for tokens in args.tokens:
        for batch in args.batch_sizes:
            judge = ClassifierJudge(model=args.model, unsafe_label="jailbroken", max_length=tokens,
                                    batch_size=batch, device="cpu", quantize=args.quantize)
            judge.setup()
            lengths = {len(ids) for ids in judge.encode(prompts[:4], responses[:4])["input_ids"]}
            if lengths != {tokens}:
                raise SystemExit(f"pairs encode to {sorted(lengths)} tokens, not {tokens}: the tokenizer or model "
                                 "caps the length")
            malloc_trim()
            base = rss_bytes()
            reset_ok = reset_peak()
            speed = responses_per_second(judge, prompts, responses, batch)
            results.append({"tokens": tokens, "batch_size": batch, "responses_per_s": speed,
                            "ratio_to_keyword": speed / keyword_speed,
                            "peak_extra_mib": (peak_bytes(reset_ok) - base) / 2**20})
    cpu = cpu_facts()["model"]
    print(f"{args.model}{' (int8)' if args.quantize else ''} on {cpu}, {args.threads} threads, {args.n} pairs; keyword judge {keyword_speed:,.0f}/s")
    print(f"{'tokens':>6} {'batch':>5} {'responses/s':>12} {'vs keyword':>11} {'peak MiB':>9}")
    for r in results:
        print(f"{r['tokens']:>6} {r['batch_size']:>5} {r['responses_per_s']:>12.1f} {r['ratio_to_keyword']:>10.4f}x "
              f"{r['peak_extra_mib']:>9.0f}")
    if args.out:
        write_json(args.out, {"model": args.model, "quantize": args.quantize, "cpu": cpu, "threads": args.threads, "n": args.n,
                              "keyword_responses_per_s": keyword_speed, "results": results})


if __name__ == "__main__":
    main()
