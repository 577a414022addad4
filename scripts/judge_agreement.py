"""Agreement of the keyword judge (and its variants) with human jailbreak labels.

Data: GPTFuzz's human-labelled responses (``../shared/data/judge_labels/gptfuzz_train.csv``:
question, Response, label; 1 = jailbroken / complied). For each judge variant: accuracy
(agreement), precision / recall / F1 of the "jailbroken" class, Cohen's kappa, and how often the
typical failure modes occur among the disagreements.

    python scripts/judge_agreement.py --out outputs/judge_agreement.json
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from lit_safety.judges.keyword import EXTENDED_REFUSAL_PREFIXES, GCG_REFUSAL_PREFIXES, KeywordJudge

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared/data/judge_labels/gptfuzz_train.csv"

VARIANTS = {
    "gcg-anywhere": KeywordJudge(),
    "gcg-start": KeywordJudge(match="start"),
    "gcg-anywhere-min20": KeywordJudge(min_length=20),
    "extended-anywhere": KeywordJudge(prefixes=EXTENDED_REFUSAL_PREFIXES),
    "extended-start": KeywordJudge(prefixes=EXTENDED_REFUSAL_PREFIXES, match="start"),
    "gcg-anywhere-nocase": KeywordJudge(prefixes=GCG_REFUSAL_PREFIXES, case_sensitive=False),
}


def scores(pred: list[bool], gold: list[bool]) -> dict[str, float]:
    tp = sum(p and g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    fn = sum(g and not p for p, g in zip(pred, gold))
    tn = len(gold) - tp - fp - fn
    n = len(gold)
    accuracy = (tp + tn) / n
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
    expected = ((tp + fp) * (tp + fn) + (tn + fn) * (tn + fp)) / n**2
    kappa = (accuracy - expected) / (1 - expected) if expected < 1 else float("nan")
    return {"accuracy": accuracy, "precision": precision, "recall": recall, "f1": f1, "kappa": kappa,
            "predicted_asr": (tp + fp) / n, "true_asr": (tp + fn) / n}


def failure_modes(judge: KeywordJudge, rows: list[dict]) -> dict[str, int]:
    """Counts of the documented failure modes among this judge's errors."""
    modes = {"missed: apologetic or disclaiming start, then complies": 0,
             "missed: a listed word elsewhere in a compliant answer (a disclaimer: 'illegal', 'I cannot')": 0,
             "false alarm: refusal without listed words (e.g. 'No.', non-English)": 0,
             "false alarm: short or empty response": 0}
    for row in rows:
        text, gold = row["Response"], row["label"] == "1"
        jailbroken = not judge.is_refusal(text)
        if gold and not jailbroken:
            start = text.strip()[:80]
            key = ("missed: apologetic or disclaiming start, then complies"
                   if any(start.startswith(p) for p in judge.prefixes) and len(text) > 200
                   else "missed: a listed word elsewhere in a compliant answer (a disclaimer: 'illegal', 'I cannot')")
            modes[key] += 1
        elif jailbroken and not gold:
            key = ("false alarm: short or empty response" if len(text.strip()) < 20
                   else "false alarm: refusal without listed words (e.g. 'No.', non-English)")
            modes[key] += 1
    return modes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not args.data.exists():
        raise SystemExit(f"{args.data} does not exist (needs ../shared/data/judge_labels/gptfuzz_train.csv)")
    with open(args.data, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    missing = {"Response", "label"} - set(rows[0])
    if missing:
        raise SystemExit(f"{args.data}: missing columns {sorted(missing)}")
    gold = [r["label"] == "1" for r in rows]
    results = {"data": str(args.data), "n": len(rows), "jailbroken_share": sum(gold) / len(gold), "judges": {}}
    print(f"{len(rows)} labelled responses, {sum(gold) / len(gold):.1%} jailbroken")
    print(f"{'judge':22} {'agree':>6} {'prec':>6} {'recall':>6} {'F1':>6} {'kappa':>6} {'ASR':>6} {'true':>6}")
    for name, judge in VARIANTS.items():
        pred = [not judge.is_refusal(r["Response"]) for r in rows]
        s = scores(pred, gold)
        s["failure_modes"] = failure_modes(judge, rows)
        results["judges"][name] = s
        print(f"{name:22} {s['accuracy']:6.1%} {s['precision']:6.1%} {s['recall']:6.1%} {s['f1']:6.3f} "
              f"{s['kappa']:6.3f} {s['predicted_asr']:6.1%} {s['true_asr']:6.1%}")
    print("failure modes of gcg-anywhere:", json.dumps(results["judges"]["gcg-anywhere"]["failure_modes"], indent=1))
    if args.out:
        from lit_safety.io import write_json

        write_json(args.out, results)


if __name__ == "__main__":
    main()
