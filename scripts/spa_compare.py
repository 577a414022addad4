"""SPA on an aligned organism: task fine-tuning with the ESI top-1% frozen vs full fine-tuning vs a
random 1% frozen.

Each run fine-tunes ``--steps`` steps on the organism's arithmetic word problems, optionally with
erosion pressure: a share of harmful-prompt -> compliant-answer pairs (``--harmful-ratio``, as in
harmful fine-tuning studies) or task answers in an always-comply style (``--response-prefix``). Before and after, it
measures the refusal rate on held-out harmful prompts, the benign answer rate, and task accuracy
(exact match of the "#### N" answer on held-out word problems).

    python scripts/spa_compare.py --out outputs/spa_compare.json
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import lightning as L
import torch

from lit_safety.data.datamodules import InstructionDataModule
from lit_safety.generation import generate_responses
from lit_safety.judges.keyword import EXTENDED_REFUSAL_PREFIXES, KeywordJudge
from lit_safety.models.loading import load_model_and_tokenizer
from lit_safety.modules.intervention import SafetyInterventionModule
from lit_safety.organism.corpus import task_examples
from lit_safety.organism.evaluate import evaluate_behaviour

RUNS = {"spa-esi": ("spa", "esi"), "spa-random": ("spa", "random"), "full": ("full", "esi")}
ANSWER = re.compile(r"####\s*(-?\d+)")


def task_accuracy(model, tokenizer, n: int) -> float:
    examples = task_examples(n, seed=4321, split="heldout")
    responses = generate_responses(model, tokenizer, [ex.prompt for ex in examples], batch_size=64, max_new_tokens=48)
    hits = sum(bool((m := ANSWER.search(r)) and m.group(1) == ex.answer) for ex, r in zip(examples, responses))
    return hits / len(examples)


def measure(model, tokenizer, n: int) -> dict[str, float]:
    result = evaluate_behaviour(model, tokenizer, n=n, judge=KeywordJudge(prefixes=EXTENDED_REFUSAL_PREFIXES))
    return {"refusal_rate": result["heldout_harmful_refusal_rate"],
            "benign_answer_rate": result["heldout_benign_answer_rate"],
            "task_accuracy": task_accuracy(model, tokenizer, n)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="organism-dense-aligned")
    parser.add_argument("--methods", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--harmful-ratio", type=float, default=0.1)
    parser.add_argument("--response-prefix", default="",
                        help='put before every task answer, e.g. "Sure, here is how to solve it. " (always-comply style)')
    parser.add_argument("--ratio", type=float, default=0.01)
    parser.add_argument("--scope", default="global", choices=["global", "per_tensor", "per_row"])
    parser.add_argument("--objective", default="refusal", choices=["refusal", "compliance"])
    parser.add_argument("--include-lm-head", action="store_true")
    parser.add_argument("--all-parameters", action="store_true", help="score embeddings, norms and lm_head too")
    parser.add_argument("-n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path("outputs/spa_compare"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)

    model, tokenizer = load_model_and_tokenizer(args.model)
    before = measure(model, tokenizer, args.n)
    del model
    print("before:", {k: f"{v:.1%}" for k, v in before.items()}, flush=True)
    results = {}
    for name in args.methods:
        method, selection = RUNS[name]
        L.seed_everything(args.seed)
        module = SafetyInterventionModule(model=args.model, method=method, selection=selection, ratio=args.ratio,
                                          scope=args.scope, objective=args.objective,
                                          include_lm_head=args.include_lm_head,
                                          all_parameters=args.all_parameters, learning_rate=args.lr, weight_decay=args.weight_decay,
                                          output_dir=str(args.workdir / name), save_model=False, seed=args.seed)
        data = InstructionDataModule(tokenizer=args.model, num_samples=4000, harmful_ratio=args.harmful_ratio,
                                     response_prefix=args.response_prefix,
                                     batch_size=16, max_length=128, val_fraction=0.0, seed=args.seed)
        trainer = L.Trainer(max_steps=args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0)
        start = time.perf_counter()
        trainer.fit(module, datamodule=data)
        after = measure(module.model, module.tokenizer, args.n)
        after["seconds"] = time.perf_counter() - start
        after["refusal_drop_points"] = 100 * (before["refusal_rate"] - after["refusal_rate"])
        if module.frozen_verified is not None:
            after["frozen_bit_identical"] = module.frozen_verified
        results[name] = after
        print(name, {k: (f"{v:.1%}" if isinstance(v, float) and k not in ("seconds", "refusal_drop_points") else v)
                     for k, v in after.items()}, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"before": before, "after": results, **{k: str(v) for k, v in vars(args).items()}},
                                       indent=2))


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    main()
