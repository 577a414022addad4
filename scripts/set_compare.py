"""SET on an unaligned organism: ESI-selected weights vs random / bottom selections vs full fine-tuning.

For each method and learning rate in a small sweep, trains ``--steps`` optimizer steps on the
organism's harmful-prompt -> refusal pairs (mixed with benign answers), then measures, on held-out
prompts (templates and intents the training split never produces), the attack success rate
(harmful prompts answered, keyword judge) and the benign answer rate. Reports the best learning
rate of each method (lowest ASR among runs that keep the benign answer rate within 5 points), so
no method is handicapped by one fixed rate.

    python scripts/set_compare.py --out outputs/set_compare.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning as L
import torch

from lit_safety.data.datamodules import RefusalDataModule
from lit_safety.judges.keyword import EXTENDED_REFUSAL_PREFIXES, KeywordJudge
from lit_safety.models.loading import load_model_and_tokenizer
from lit_safety.modules.intervention import SafetyInterventionModule
from lit_safety.organism.evaluate import evaluate_behaviour

RUNS = {  # method, selection
    "esi": ("set", "esi"),
    "random": ("set", "random"),
    "bottom": ("set", "bottom"),
    "full": ("full", "esi"),
}


def measure(model, tokenizer, n: int) -> dict[str, float]:
    # GCG's list misses "I can't help with ...", the opening SET-trained organisms often learn.
    result = evaluate_behaviour(model, tokenizer, n=n, judge=KeywordJudge(prefixes=EXTENDED_REFUSAL_PREFIXES))
    return {"asr": result["heldout_harmful_compliance_rate"], "benign_answer_rate": result["heldout_benign_answer_rate"]}


def run(name: str, lr: float, args) -> dict:
    method, selection = RUNS[name]
    L.seed_everything(args.seed)
    module = SafetyInterventionModule(model=args.model, method=method, selection=selection, ratio=args.ratio,
                                      objective=args.objective, learning_rate=lr, output_dir=str(args.workdir / f"{name}-{lr}"), save_model=False,
                                      seed=args.seed)
    data = RefusalDataModule(tokenizer=args.model, num_samples=2000, benign_ratio=args.benign_ratio, batch_size=16,
                             max_length=128,
                             seed=args.seed)
    trainer = L.Trainer(max_steps=args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    after = measure(module.model, module.tokenizer, args.n)
    return {"method": name, "lr": lr, "seconds": seconds, "trainable": module.trainable_weights, **after}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="organism-dense-unaligned")
    parser.add_argument("--methods", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--lrs", nargs="+", type=float, default=[1e-2, 3e-2, 5e-2], help="sweep for the sparse methods")
    parser.add_argument("--full-lrs", nargs="+", type=float, default=[1e-4, 3e-4, 1e-3], help="sweep for full fine-tuning")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--ratio", type=float, default=0.01)
    parser.add_argument("--objective", default="refusal", choices=["refusal", "compliance"], help="ESI objective")
    parser.add_argument("--benign-ratio", type=float, default=0.25, help="share of benign pairs in the SET data")
    parser.add_argument("-n", type=int, default=200, help="held-out prompts of each kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path("outputs/set_compare"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)

    model, tokenizer = load_model_and_tokenizer(args.model)
    before = measure(model, tokenizer, args.n)
    del model
    print(f"before: ASR {before['asr']:.1%}, benign answer rate {before['benign_answer_rate']:.1%}")
    runs = []
    for name in args.methods:
        for lr in (args.full_lrs if name == "full" else args.lrs):
            result = run(name, lr, args)
            runs.append(result)
            print(f"{name:7s} lr={lr:<7g} ASR {result['asr']:6.1%}  benign {result['benign_answer_rate']:6.1%}  "
                  f"({result['seconds']:.0f} s, {result['trainable']:,} trainable)", flush=True)
    best = {}
    for name in args.methods:
        candidates = [r for r in runs if r["method"] == name]
        ok = [r for r in candidates if r["benign_answer_rate"] >= before["benign_answer_rate"] - 0.05] or candidates
        best[name] = min(ok, key=lambda r: r["asr"])
    print("\nbest of the sweep per method (benign answer rate within 5 points where possible):")
    print(f"{'method':8s} {'lr':>8s} {'ASR':>7s} {'rel. ASR reduction':>19s} {'benign':>7s}")
    for name, r in best.items():
        reduction = 1 - r["asr"] / before["asr"] if before["asr"] else float("nan")
        r["relative_asr_reduction"] = reduction
        print(f"{name:8s} {r['lr']:8g} {r['asr']:7.1%} {reduction:19.1%} {r['benign_answer_rate']:7.1%}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"before": before, "runs": runs, "best": best, "steps": args.steps,
                                        "ratio": args.ratio, "model": args.model}, indent=2))


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    main()
