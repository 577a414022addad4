"""Choose the trained judge's settings by k-fold cross-validation on the TRAINING part of the labels.

The held-out part (``val_fraction`` of each class, seeded) is never read here: each fold trains on
the other folds of the training part and validates on its own fold (``JudgeDataModule``'s
``cv_folds``/``cv_fold``). Per setting the mean and spread of F1 (jailbroken class) and accuracy
over folds; the chosen setting is the highest mean F1. The builtin ``judge-minilm`` uses it.

    python scripts/judge_cv.py --learning-rates 5e-5 1e-4 --folds 2 --out outputs/judge_cv.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lit_safety.io import write_json
from lit_safety.judges.builtin import labels_path
from lit_safety.modules.judge import fit_judge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", type=Path, default=None, help="label file (default: the builtin judge's)")
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[5e-5, 1e-4])
    parser.add_argument("--epochs", type=int, nargs="+", default=[1])
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write every fold's metrics and the choice here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    labels = args.labels or labels_path()
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        for epochs in args.epochs:
            for lr in args.learning_rates:
                for fold in range(args.folds):
                    module = fit_judge(labels, Path(work) / f"e{epochs}-lr{lr:g}-f{fold}", epochs=epochs,
                                       learning_rate=lr, cv_folds=args.folds, cv_fold=fold, save_model=False)
                    v = module.val_metrics
                    rows.append({"epochs": epochs, "learning_rate": lr, "fold": fold, "f1": v["f1"],
                                 "accuracy": v["accuracy"], "precision": v["precision"], "recall": v["recall"],
                                 "n": v["n"], "seconds": module.record["seconds"]})
                    print(f"epochs {epochs} lr {lr:g} fold {fold}: F1 {v['f1']:.4f} accuracy {v['accuracy']:.4f} "
                          f"({module.record['seconds']:.0f} s)", flush=True)
    settings = []
    for epochs in args.epochs:
        for lr in args.learning_rates:
            rs = [r for r in rows if r["epochs"] == epochs and r["learning_rate"] == lr]
            settings.append({"epochs": epochs, "learning_rate": lr,
                             "f1_mean": statistics.fmean(r["f1"] for r in rs),
                             "f1_std": statistics.pstdev(r["f1"] for r in rs),
                             "accuracy_mean": statistics.fmean(r["accuracy"] for r in rs)})
    best = max(settings, key=lambda s: s["f1_mean"])
    print(f"\n{args.folds}-fold CV on the training part of {labels}:")
    for s in settings:
        mark = "  <- chosen" if s is best else ""
        print(f"  epochs {s['epochs']} lr {s['learning_rate']:g}: F1 {s['f1_mean']:.4f} ± {s['f1_std']:.4f}, "
              f"accuracy {s['accuracy_mean']:.4f}{mark}")
    if args.out:
        write_json(args.out, {"labels": str(labels), "folds": args.folds, "runs": rows, "settings": settings,
                              "chosen": best, "seconds": time.perf_counter() - started})


if __name__ == "__main__":
    main()
