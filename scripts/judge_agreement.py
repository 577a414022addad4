"""Agreement of the keyword judge (and its variants) with human jailbreak labels.

Data: GPTFuzz's human-labelled responses (``../shared/data/judge_labels/gptfuzz_train.csv``:
question, Response, label; 1 = jailbroken / complied). For each judge variant: accuracy
(agreement), precision / recall / F1 of the "jailbroken" class, Cohen's kappa, and how often the
typical failure modes occur among the disagreements. The numbers come from
``lit_safety.evaluation.judge_agreement`` (the implementation of ``lit-safety test --config
configs/judge_eval.yaml``, which validates any one judge, keyword, guard, classifier or API, with
a confusion matrix and a calibration plot); this script compares the keyword variants side by side
and counts their failure modes.

    python scripts/judge_agreement.py --out outputs/judge_agreement.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lit_safety.data.files import DataError
from lit_safety.data.judge import LabelledResponse, read_judge_labels
from lit_safety.evaluation.judge_agreement import agreement_scores, confusion_counts
from lit_safety.io import write_json
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
    """Agreement of one variant's verdicts with the labels (lit_safety.evaluation.judge_agreement)."""
    return agreement_scores(**confusion_counts(pred, gold))


def failure_modes(judge: KeywordJudge, records: list[LabelledResponse]) -> dict[str, int]:
    """Counts of the documented failure modes among this judge's errors."""
    modes = {"missed: apologetic or disclaiming start, then complies": 0,
             "missed: a listed word elsewhere in a compliant answer (a disclaimer: 'illegal', 'I cannot')": 0,
             "false alarm: refusal without listed words (e.g. 'No.', non-English)": 0,
             "false alarm: short or empty response": 0}
    for record in records:
        text, gold = record.response, record.label == 1
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
    try:
        rows = read_judge_labels(args.data)  # GPTFuzz columns; the questions file found beside it
    except DataError as err:
        raise SystemExit(str(err)) from None
    gold = [r.label == 1 for r in rows]
    results = {"data": str(args.data), "n": len(rows), "jailbroken_share": sum(gold) / len(gold), "judges": {}}
    print(f"{len(rows)} labelled responses, {sum(gold) / len(gold):.1%} jailbroken")
    print(f"{'judge':22} {'agree':>6} {'prec':>6} {'recall':>6} {'F1':>6} {'kappa':>6} {'ASR':>6} {'true':>6}")
    for name, judge in VARIANTS.items():
        pred = [not judge.is_refusal(r.response) for r in rows]
        s = scores(pred, gold)
        s["failure_modes"] = failure_modes(judge, rows)
        results["judges"][name] = s
        print(f"{name:22} {s['accuracy']:6.1%} {s['precision']:6.1%} {s['recall']:6.1%} {s['f1']:6.3f} "
              f"{s['kappa']:6.3f} {s['predicted_asr']:6.1%} {s['true_asr']:6.1%}")
    print("failure modes of gcg-anywhere:", json.dumps(results["judges"]["gcg-anywhere"]["failure_modes"], indent=1))
    if args.out:
        write_json(args.out, results)


if __name__ == "__main__":
    main()
