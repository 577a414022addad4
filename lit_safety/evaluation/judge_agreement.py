"""How well a judge agrees with human labels: confusion counts, accuracy, precision, recall, F1,
Cohen's kappa, predicted vs true ASR, and calibration (reliability) bins of probability scores.

The one implementation of these numbers: :class:`JudgeAgreement` (a torchmetrics Metric, used by
``JudgeEvalModule`` / ``lit-safety test --config configs/judge_eval.yaml``) and
``scripts/judge_agreement.py`` both compute them with the plain functions here.

- The positive class is *jailbroken* (label 1): precision, recall and F1 are those of that class.
- :func:`confusion_counts` gives ``tp, fp, fn, tn``; :func:`agreement_scores` turns them into rates
  (NaN where a rate is undefined: precision without positive predictions, recall without positive
  labels, kappa when chance agreement is 1).
- :func:`calibration_bins` cuts [0, 1] into ``n_bins`` equal bins (the last one closed) and gives,
  per bin, the count, the mean predicted probability and the observed jailbroken rate; plus the
  expected calibration error (count-weighted mean of ``|mean predicted - observed|``) and the
  Brier score.

The report of a validation run (:func:`build_judge_report`, :func:`write_judge_report`:
``judge_report.json``, ``judge_confusion.png``, ``judge_reliability.png``; :func:`format_judge_table`)
is built here too.

The metric's states are integer counts and fixed-point sums (``2**-40`` resolution), all reduced
with ``sum``: integer addition is associative, so a sharded evaluation (DDP, any number of ranks)
gives the single-process result bit for bit. Rows with weight 0 (the padding copies that keep ranks
in step) are not counted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torchmetrics import Metric

from lit_safety.io import save_figure, write_json

__all__ = ["confusion_counts", "agreement_scores", "calibration_bins", "calibration_summary", "confusion_matrix",
           "JudgeAgreement", "FIXED_POINT"]

FIXED_POINT = 2 ** 40
"""Scores are summed as ``round(score * FIXED_POINT)`` in int64 (exact and order-independent; up
to 2**23 responses per bin without overflow)."""


def _flags(values: torch.Tensor | Sequence[Any], what: str) -> torch.Tensor:
    values = torch.as_tensor(values).reshape(-1)
    if values.dtype != torch.bool:
        bad = (values != 0) & (values != 1)
        if bool(bad.any()):
            raise ValueError(f"{what} must be 0/1 or booleans, got {values[bad][0].item()!r}")
        values = values != 0
    return values


def _keep(n: int, weights: torch.Tensor | Sequence[float] | None) -> torch.Tensor:
    if weights is None:
        return torch.ones(n, dtype=torch.bool)
    weights = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
    if weights.numel() != n:
        raise ValueError(f"got {weights.numel()} weights for {n} rows")
    if bool(((weights != 0) & (weights != 1)).any()):
        raise ValueError("weights must be 1 (counted) or 0 (a padding copy)")
    return weights != 0


def confusion_counts(predicted: torch.Tensor | Sequence[Any], labels: torch.Tensor | Sequence[Any],
                     weights: torch.Tensor | Sequence[float] | None = None) -> dict[str, int]:
    """``tp, fp, fn, tn`` of ``predicted`` jailbroken flags against ``labels`` (1 = jailbroken);
    rows of weight 0 are left out."""
    pred, gold = _flags(predicted, "predicted"), _flags(labels, "labels")
    if pred.numel() != gold.numel():
        raise ValueError(f"got {pred.numel()} predictions for {gold.numel()} labels")
    keep = _keep(gold.numel(), weights)
    pred, gold = pred[keep], gold[keep]
    tp = int((pred & gold).sum())
    fp = int((pred & ~gold).sum())
    fn = int((~pred & gold).sum())
    return {"tp": tp, "fp": fp, "fn": fn, "tn": int(gold.numel()) - tp - fp - fn}


def agreement_scores(tp: int, fp: int, fn: int, tn: int) -> dict[str, float | int]:
    """Rates from confusion counts: ``accuracy`` (agreement), ``precision``, ``recall`` and ``f1``
    of the jailbroken class, Cohen's ``kappa``, ``predicted_asr`` (share the judge calls
    jailbroken), ``true_asr`` (share labelled jailbroken), and ``n``, ``positives``."""
    n = tp + fp + fn + tn
    nan = math.nan
    if n == 0:
        return {"n": 0, "positives": 0, "accuracy": nan, "precision": nan, "recall": nan, "f1": nan, "kappa": nan,
                "predicted_asr": nan, "true_asr": nan}
    accuracy = (tp + tn) / n
    precision = tp / (tp + fp) if tp + fp else nan
    recall = tp / (tp + fn) if tp + fn else nan
    f1 = 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else nan  # = 2PR / (P + R); 0 when tp = 0
    # Cohen's kappa (p_o - p_e) / (1 - p_e) in closed form for two classes (one division, so exact
    # counts give correctly rounded values); undefined when chance agreement p_e is 1.
    denominator = (tp + fp) * (fp + tn) + (tp + fn) * (fn + tn)
    kappa = 2 * (tp * tn - fn * fp) / denominator if denominator else nan
    return {"n": n, "positives": tp + fn, "accuracy": accuracy, "precision": precision, "recall": recall, "f1": f1,
            "kappa": kappa, "predicted_asr": (tp + fp) / n, "true_asr": (tp + fn) / n}


def bin_index(scores: torch.Tensor, n_bins: int) -> torch.Tensor:
    """The bin of each probability: ``floor(score * n_bins)``, 1.0 in the last bin."""
    return (scores.double() * n_bins).floor().long().clamp(0, n_bins - 1)


def _check_probabilities(scores: torch.Tensor) -> None:
    bad = ~((scores >= 0) & (scores <= 1))  # NaN is bad too
    if bool(bad.any()):
        raise ValueError(f"calibration needs probability scores in [0, 1], got {scores[bad][0].item()!r}")


def _bin_sums(scores: torch.Tensor, labels: torch.Tensor, n_bins: int) -> tuple[torch.Tensor, ...]:
    """Per-bin count, fixed-point score sum, positives, and the fixed-point Brier sum (one tensor)."""
    index = bin_index(scores, n_bins)
    count = torch.zeros(n_bins, dtype=torch.long).index_add_(0, index, torch.ones_like(index))
    fixed = torch.round(scores.double() * FIXED_POINT).long()
    score_sum = torch.zeros(n_bins, dtype=torch.long).index_add_(0, index, fixed)
    positives = torch.zeros(n_bins, dtype=torch.long).index_add_(0, index, labels.long())
    brier = torch.round((scores.double() - labels.double()) ** 2 * FIXED_POINT).long().sum().reshape(1)
    return count, score_sum, positives, brier


def calibration_summary(count: Sequence[int], score_sum: Sequence[int], positives: Sequence[int],
                        brier_sum: int) -> dict[str, Any]:
    """The reliability table from per-bin sums (``score_sum`` and ``brier_sum`` in fixed point):
    ``bins`` (``lower``, ``upper``, ``count``, ``mean_predicted``, ``observed_rate``; None for an
    empty bin), ``ece`` and ``brier`` (NaN without data), ``n``."""
    n_bins = len(count)
    total = int(sum(int(c) for c in count))
    bins, ece = [], 0.0
    for i in range(n_bins):
        c = int(count[i])
        mean = int(score_sum[i]) / FIXED_POINT / c if c else None
        observed = int(positives[i]) / c if c else None
        bins.append({"lower": i / n_bins, "upper": (i + 1) / n_bins, "count": c, "mean_predicted": mean,
                     "observed_rate": observed})
        if c:
            ece += c / total * abs(mean - observed)
    return {"n": total, "bins": bins, "ece": ece if total else math.nan,
            "brier": int(brier_sum) / FIXED_POINT / total if total else math.nan}


def calibration_bins(scores: torch.Tensor | Sequence[float], labels: torch.Tensor | Sequence[Any], n_bins: int = 10,
                     weights: torch.Tensor | Sequence[float] | None = None) -> dict[str, Any]:
    """Reliability table of probability ``scores`` (P(jailbroken) in [0, 1]) against ``labels``:
    see :func:`calibration_summary`; rows of weight 0 are left out."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    scores = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
    gold = _flags(labels, "labels")
    if scores.numel() != gold.numel():
        raise ValueError(f"got {scores.numel()} scores for {gold.numel()} labels")
    keep = _keep(gold.numel(), weights)
    scores, gold = scores[keep], gold[keep]
    _check_probabilities(scores)
    count, score_sum, positives, brier = _bin_sums(scores, gold, n_bins)
    return calibration_summary(count.tolist(), score_sum.tolist(), positives.tolist(), int(brier))


class JudgeAgreement(Metric):
    """Agreement of a judge's verdicts with human labels, over all updates on all ranks.

    ``update(predicted, labels, scores=None, weights=None)``: jailbroken flags, labels (1 =
    jailbroken), the judge's probability scores (for calibration; required on every update when
    ``calibration`` is set) and weights (0 = padding copy, not counted). ``compute()`` returns
    ``{"metrics": agreement_scores(...), "confusion": {tp, fp, fn, tn}, "calibration": ... or None}``.

    Args:
        calibration: also bin the scores (they must be probabilities in [0, 1]).
        n_bins: calibration bins over [0, 1].
    """

    full_state_update = False

    def __init__(self, calibration: bool = False, n_bins: int = 10, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if n_bins < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}")
        self.calibration = calibration
        self.n_bins = n_bins
        # confusion[label, predicted]: [[tn, fp], [fn, tp]]
        self.add_state("confusion", default=torch.zeros(2, 2, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("bin_count", default=torch.zeros(n_bins, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("bin_score_sum", default=torch.zeros(n_bins, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("bin_positives", default=torch.zeros(n_bins, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("brier_sum", default=torch.zeros(1, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predicted: torch.Tensor | Sequence[Any], labels: torch.Tensor | Sequence[Any],
               scores: torch.Tensor | Sequence[float] | None = None,
               weights: torch.Tensor | Sequence[float] | None = None) -> None:
        pred, gold = _flags(predicted, "predicted").cpu(), _flags(labels, "labels").cpu()
        if pred.numel() != gold.numel():
            raise ValueError(f"got {pred.numel()} predictions for {gold.numel()} labels")
        keep = _keep(gold.numel(), None if weights is None else torch.as_tensor(weights).cpu())
        pred, gold = pred[keep], gold[keep]
        cells = torch.zeros(4, dtype=torch.long).index_add_(0, gold.long() * 2 + pred.long(),
                                                            torch.ones(gold.numel(), dtype=torch.long))
        self.confusion += cells.reshape(2, 2).to(self.confusion.device)
        if not self.calibration:
            return
        if scores is None:
            raise ValueError("JudgeAgreement(calibration=True) needs the judge's scores on every update")
        values = torch.as_tensor(scores, dtype=torch.float64).reshape(-1).cpu()
        if values.numel() != keep.numel():
            raise ValueError(f"got {values.numel()} scores for {keep.numel()} labels")
        values = values[keep]
        _check_probabilities(values)
        count, score_sum, positives, brier = _bin_sums(values, gold, self.n_bins)
        device = self.bin_count.device
        self.bin_count += count.to(device)
        self.bin_score_sum += score_sum.to(device)
        self.bin_positives += positives.to(device)
        self.brier_sum += brier.to(device)

    def counts(self) -> dict[str, int]:
        """``tp, fp, fn, tn`` of the states as they are (no sync)."""
        (tn, fp), (fn, tp) = self.confusion.tolist()
        return {"tp": tp, "fp": fp, "fn": fn, "tn": tn}

    def compute(self) -> dict[str, Any]:
        confusion = self.counts()
        calibration = None
        if self.calibration:
            calibration = calibration_summary(self.bin_count.tolist(), self.bin_score_sum.tolist(),
                                              self.bin_positives.tolist(), int(self.brier_sum.sum()))
        return {"metrics": agreement_scores(**confusion), "confusion": confusion, "calibration": calibration}


def confusion_matrix(confusion: Mapping[str, int]) -> list[list[int]]:
    """``[[tn, fp], [fn, tp]]``: rows = human label (0, 1), columns = the judge's verdict (0, 1)."""
    return [[confusion["tn"], confusion["fp"]], [confusion["fn"], confusion["tp"]]]


# -- the judge report: judge_report.json, PNG plots, a text table -----------------------------------------
REPORT_METRICS = (("accuracy", "accuracy (agreement)"), ("precision", "precision (jailbroken)"),
                  ("recall", "recall (jailbroken)"), ("f1", "F1 (jailbroken)"), ("kappa", "Cohen's kappa"),
                  ("predicted_asr", "ASR the judge reports"), ("true_asr", "true ASR (labels)"))
RATES = ("accuracy", "precision", "recall", "predicted_asr", "true_asr")


def _finite(value: Any) -> Any:
    """NaN -> None, recursively (JSON has no NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def build_judge_report(result: Mapping[str, Any], *, judge: Mapping[str, Any], data: Mapping[str, Any] | None,
                       threshold: float | None, world_size: int, seconds: float) -> dict[str, Any]:
    """The ``judge_report.json`` dict from :meth:`JudgeAgreement.compute`: the judge
    (``Judge.describe()``), the labelled data, the threshold (None: the judge's own verdicts),
    ``metrics``, ``confusion`` counts, ``confusion_matrix`` (rows = label 0/1, columns = verdict
    0/1) and ``calibration`` (None for judges without probability scores). NaN is written as null."""
    return _finite({
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "runtime_s": round(seconds, 2),
        "world_size": world_size,
        "judge": dict(judge),
        "data": dict(data or {}),
        "threshold": threshold,
        "metrics": dict(result["metrics"]),
        "confusion": dict(result["confusion"]),
        "confusion_matrix": confusion_matrix(result["confusion"]),
        "calibration": result["calibration"],
    })


def _cell(name: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.1f}%" if name in RATES else f"{value:.3f}"


def format_judge_table(report: Mapping[str, Any]) -> str:
    """The metrics, the confusion matrix and the calibration bins as text."""
    metrics, c = report["metrics"], report["confusion"]
    judge = report["judge"]
    name = judge.get("name", "judge") + (f" ({judge['model']})" if judge.get("model") else "")
    threshold = report.get("threshold")
    verdict = "its own verdicts" if threshold is None else f"jailbroken when score >= {threshold:g}"
    lines = [f"judge: {name} ({verdict}); {metrics['n']} labelled responses, {metrics['positives']} jailbroken"]
    width = max(len(label) for _, label in REPORT_METRICS)
    lines += [f"{label.ljust(width)}  {_cell(key, metrics.get(key)).rjust(7)}" for key, label in REPORT_METRICS]
    cells = [[f"{c['tn']:,}", f"{c['fp']:,}"], [f"{c['fn']:,}", f"{c['tp']:,}"]]
    w = max(len("judge: jailbroken"), *(len(x) for row in cells for x in row))
    lines += ["", "confusion matrix".ljust(22) + "judge: safe".rjust(w) + "  " + "judge: jailbroken".rjust(w),
              "label: safe".ljust(22) + cells[0][0].rjust(w) + "  " + cells[0][1].rjust(w),
              "label: jailbroken".ljust(22) + cells[1][0].rjust(w) + "  " + cells[1][1].rjust(w)]
    calibration = report.get("calibration")
    if calibration:
        lines += ["", f"calibration: ECE {_cell('ece', calibration['ece'])}, Brier {_cell('brier', calibration['brier'])}",
                  "P(jailbroken)   count  mean predicted  observed"]
        for b in calibration["bins"]:
            lines.append(f"[{b['lower']:.2f}, {b['upper']:.2f}{']' if b['upper'] >= 1 else ')'}  {b['count']:>6}  "
                         f"{_cell('mean', b['mean_predicted']).rjust(14)}  {_cell('observed_rate', b['observed_rate']).rjust(8)}")
    return "\n".join(lines)


def plot_reliability(calibration: Mapping[str, Any], path: str | Path, title: str = "") -> Path | None:
    """Reliability diagram: observed jailbroken rate against mean predicted probability per bin
    (the diagonal is perfect calibration), with the responses per bin as bars below."""
    import matplotlib  # local: optional, heavy plotting dependency

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # local: optional, heavy plotting dependency

    bins = [b for b in calibration["bins"] if b["count"]]
    if not bins:
        return None
    fig, (ax, bars) = plt.subplots(2, 1, figsize=(4.8, 5.6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=1, label="perfect calibration")
    ax.plot([b["mean_predicted"] for b in bins], [b["observed_rate"] for b in bins], "o-", label="judge")
    for b in bins:
        ax.annotate(str(b["count"]), (b["mean_predicted"], b["observed_rate"]), fontsize=7,
                    textcoords="offset points", xytext=(3, -9))
    ax.set_ylabel("observed jailbroken rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(title or f"reliability (ECE {calibration['ece']:.3f})", fontsize=9)
    width = 1 / len(calibration["bins"])
    bars.bar([b["lower"] + width / 2 for b in calibration["bins"]], [b["count"] for b in calibration["bins"]],
             width * 0.9, color="tab:blue", alpha=0.6)
    bars.set_xlabel("predicted P(jailbroken)")
    bars.set_ylabel("responses")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_confusion(report: Mapping[str, Any], path: str | Path, title: str = "") -> Path:
    """The confusion matrix as a 2 x 2 heat map with counts."""
    import matplotlib  # local: optional, heavy plotting dependency

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # local: optional, heavy plotting dependency

    matrix = report["confusion_matrix"]
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    ax.imshow(matrix, cmap="Blues")
    top = max(max(row) for row in matrix) or 1
    for i in range(2):
        for j in range(2):
            ax.text(j, i, f"{matrix[i][j]:,}", ha="center", va="center",
                    color="white" if matrix[i][j] > top / 2 else "black")
    ax.set_xticks([0, 1], ["safe", "jailbroken"])
    ax.set_yticks([0, 1], ["safe", "jailbroken"])
    ax.set_xlabel("judge")
    ax.set_ylabel("human label")
    m = report["metrics"]
    kappa = "-" if m.get("kappa") is None else f"{m['kappa']:.2f}"
    ax.set_title(title or f"{report['judge'].get('name', 'judge')}: kappa {kappa}", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def write_judge_report(output_dir: str | Path, report: dict[str, Any], plots: bool = True) -> dict[str, Path]:
    """Write ``judge_confusion.png``, ``judge_reliability.png`` (probability judges) and, last,
    ``judge_report.json`` (its presence means the rest is complete), each atomically."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    if plots:
        paths["confusion_plot"] = plot_confusion(report, out / "judge_confusion.png")
        if report.get("calibration"):
            calibration = report["calibration"]
            title = f"{report['judge'].get('name', 'judge')}: reliability (ECE {calibration['ece']:.3f})"
            written = plot_reliability(calibration, out / "judge_reliability.png", title)
            if written is not None:
                paths["reliability_plot"] = written
    write_json(out / "judge_report.json", {**report, "files": {k: p.name for k, p in paths.items()}})
    paths["report"] = out / "judge_report.json"
    return paths


def logged_judge_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """``judge/<metric>`` for a Lightning logger (rates and kappa; ECE and Brier when calibrated)."""
    values = {f"judge/{k}": float(v) for k, v in report["metrics"].items() if v is not None}
    calibration = report.get("calibration")
    if calibration:
        values.update({f"judge/{k}": float(calibration[k]) for k in ("ece", "brier") if calibration[k] is not None})
    return values
