"""Multiple-choice (MMLU) scoring: time and memory of the evaluator's answer log-likelihoods against
the full-logits computation it replaced, in the same process on the same questions.

The baseline is the evaluator's former method: right padding, the output layer and a log-softmax
over the whole vocabulary at every position of every option's sequence, and the answer's tokens
picked out afterwards. The measured method is :func:`lit_safety.evaluation.evaluator.answer_logprobs`:
each question's prompt runs once (left-padded, the output layer at its last position only), and
its key/value cache is repeated for the options' answer tokens. Both score the same option
sequences, built as the evaluator builds them (the chat template, the lettered options, the ask);
the script checks that they agree (largest absolute difference, and the picked letters) before it
reports the ratio. Peak memory is the process's RSS high-water mark over the baseline after loading.

    python scripts/bench_mc.py                                   # SmolLM2-135M-Instruct, 32 questions
    python scripts/bench_mc.py --model organism-dense-aligned:tiny --mc-data ../shared/data/mmlu
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from lit_safety.benchmarking import cpu_facts, malloc_trim, peak_bytes, reset_peak, rss_bytes
from lit_safety.data.chat import collate_right_padded, encode_chat
from lit_safety.evaluation.evaluator import LETTERS, SafetyEvaluator, answer_logprobs
from lit_safety.evaluation.suite import load_suite
from lit_safety.io import write_json
from lit_safety.models.loading import load_model_and_tokenizer


def full_logits_answer_logprobs(model, features: Sequence[dict], pad_token_id: int) -> torch.Tensor:
    """The former computation: full logits and log-softmax at every position (right padding)."""
    batch = collate_right_padded(features, pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["labels"][:, 1:]
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
    token_lp = logprobs.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1) * (labels != -100)
    return token_lp.sum(dim=1)


def measure(score: Callable, model, batches: Sequence[list[dict]], pad_token_id: int) -> dict:
    score(model, batches[0][:4], pad_token_id)  # warm-up
    malloc_trim()
    base = rss_bytes()
    reset_ok = reset_peak()
    start = time.perf_counter()
    values = torch.cat([score(model, features, pad_token_id) for features in batches])
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_extra_mib": (peak_bytes(reset_ok) - base) / 2**20, "values": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a builtin model name, HF directory or .gguf")
    parser.add_argument("--mc-data", default="../shared/data/mmlu", help="MMLU directory (SuiteConfig.mc_data)")
    parser.add_argument("--num-mc", type=int, default=1, help="questions per subject (SuiteConfig.num_mc)")
    parser.add_argument("--questions", type=int, default=32, help="questions scored (the first of the suite)")
    parser.add_argument("--mc-batch-size", type=int, default=8, help="questions per forward (SafetyEvaluator's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    records = load_suite(harmful_data=None, benign_data=None, task_data=None, mc_data=args.mc_data,
                         num_mc=args.num_mc).records["mc"][: args.questions]
    if not records:
        raise SystemExit(f"--mc-data {args.mc_data}: no multiple-choice questions")
    model, tokenizer = load_model_and_tokenizer(args.model)
    model.eval()
    evaluator = SafetyEvaluator(progress=False)
    questions = evaluator._mc_questions(model, tokenizer, records)
    batches, options = [], []  # options: (question, option index) per sequence, in order
    for start in range(0, len(records), args.mc_batch_size):
        features = []
        for i in range(start, min(start + args.mc_batch_size, len(records))):
            for k, letter in enumerate(LETTERS[: len(records[i].choices)]):
                features.append(encode_chat(tokenizer, questions[i], letter))
                options.append((i, k))
        batches.append(features)
    tokens = [len(f["input_ids"]) for features in batches for f in features]
    pad = tokenizer.pad_token_id
    baseline = measure(full_logits_answer_logprobs, model, batches, pad)
    measured = measure(answer_logprobs, model, batches, pad)
    difference = float((baseline["values"] - measured["values"]).abs().max())

    def picks(values: torch.Tensor) -> list[int]:
        best: dict[int, tuple[float, int]] = {}
        for (question, k), value in zip(options, values.tolist()):
            if question not in best or value > best[question][0]:
                best[question] = (value, k)
        return [best[i][1] for i in sorted(best)]

    same_picks = sum(a == b for a, b in zip(picks(baseline["values"]), picks(measured["values"])))
    cpu = cpu_facts()["model"]
    vocab = model.get_output_embeddings().weight.shape[0]
    print(f"{args.model} (vocabulary {vocab:,}) on {cpu}, {args.threads} threads: {len(records)} questions, "
          f"{len(tokens)} option sequences of {min(tokens)}-{max(tokens)} tokens (mean {sum(tokens) / len(tokens):.0f}), "
          f"{args.mc_batch_size} questions per forward")
    print(f"{'method':<22} {'seconds':>8} {'peak MiB':>9}")
    for name, r in (("full logits (before)", baseline), ("answer positions", measured)):
        print(f"{name:<22} {r['seconds']:>8.1f} {r['peak_extra_mib']:>9.0f}")
    print(f"speed-up {baseline['seconds'] / measured['seconds']:.2f}x, peak memory "
          f"{measured['peak_extra_mib'] / max(baseline['peak_extra_mib'], 1e-9):.3f}x of before; largest "
          f"log-likelihood difference {difference:.2e}; same letter picked on {same_picks}/{len(records)}")
    if args.out:
        write_json(args.out, {"model": args.model, "cpu": cpu, "threads": args.threads, "questions": len(records),
                              "sequences": len(tokens), "mean_tokens": sum(tokens) / len(tokens),
                              "mc_batch_size": args.mc_batch_size,
                              **{f"{k}_{name}": r[k] for name, r in (("before", baseline), ("after", measured))
                                 for k in ("seconds", "peak_extra_mib")},
                              "max_abs_difference": difference, "same_picks": same_picks})


if __name__ == "__main__":
    main()
