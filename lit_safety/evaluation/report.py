"""Evaluation reports: ``eval_report.json``, ``samples.jsonl``, PNG plots and a compact text table.

:func:`build_report` makes the report dict of ``lit-safety test`` (``SafetyEvalModule``) and of
``SafetyEvalCallback`` alike. A report holds one or more *stages* (:func:`stage_entry`: ``test``
for ``lit-safety test``; ``before``, ``step_N`` and ``after`` for the callback). Everything is
written atomically and only once the evaluation is complete, so an interrupted evaluation never
replaces an earlier report.

A stage in which some prompts were longer than the model's context allows (the model saw only
their end) has ``truncated_prompts`` in its metrics, their count per set
(:meth:`SafetyEvaluator.compute`), and a "prompts truncated" row in the text table; their samples
in ``samples.jsonl`` say ``"truncated": true`` and keep the full prompt.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lit_safety.evaluation.evaluator import SafetyEvaluator
from lit_safety.io import atomic_file, save_figure, write_json

#: metrics shown as bars in the before/after plot (all rates in [0, 1])
RATE_METRICS = ("harmful_asr", "harmful_keyword_asr", "jailbreak_asr", "jailbreak_keyword_asr",
                "harmful_refusal_rate", "benign_over_refusal_rate", "borderline_over_refusal_rate", "task_accuracy",
                "mc_accuracy")
LABELS = {
    "harmful_asr": "attack success rate",
    "harmful_keyword_asr": "ASR (keyword judge)",
    "jailbreak_asr": "ASR (jailbreak templates)",
    "jailbreak_keyword_asr": "ASR (jailbreak, keyword judge)",
    "harmful_refusal_rate": "refusal rate (harmful)",
    "harmful_judge_score": "mean judge score",
    "jailbreak_refusal_rate": "refusal rate (jailbreak)",
    "benign_over_refusal_rate": "over-refusal (benign)",
    "borderline_over_refusal_rate": "over-refusal (borderline)",
    "task_accuracy": "task accuracy",
    "task_perplexity": "task perplexity",
    "mc_accuracy": "multiple-choice accuracy",
}


def stage_entry(stage: str, step: int | None, metrics: dict[str, Any], seconds: float) -> dict[str, Any]:
    """One stage of a report: its name, the training step (None outside training), how long the
    evaluation took and its metrics (:meth:`SafetyEvaluator.compute`)."""
    return {"stage": stage, "step": step, "seconds": round(seconds, 2), "metrics": metrics}


def build_report(evaluator: SafetyEvaluator, counts: Mapping[str, int], stages: Sequence[dict[str, Any]], *,
                 model: str | None, world_size: int) -> dict[str, Any]:
    """The ``eval_report.json`` dict: the model, when, how (judges, generation settings, ranks),
    on what (prompts per set) and the :func:`stage_entry` results."""
    return {
        "model": model,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "runtime_s": round(sum(s["seconds"] for s in stages), 2),
        "world_size": world_size,
        "judge": evaluator.judge.describe(),
        "refusal_judge": evaluator.refusal_judge.describe(),
        "generation": asdict(evaluator.generation),
        "counts": dict(counts),
        "stages": list(stages),
    }


def logged_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The scalar metrics as ``eval/<name>`` for a Lightning logger (per-category rates stay in the report)."""
    return {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, float)}


def format_table(stages: Sequence[dict[str, Any]]) -> str:
    """Metrics as rows, stages as columns; rates in percent. A last row counts the prompts cut to fit
    the model's context (``truncated_prompts``, all sets together) when a stage had any."""
    names = [n for n in LABELS if any(n in s["metrics"] for s in stages)]
    header = ["metric"] + [s["stage"] for s in stages]
    rows = []
    for name in names:
        cells = [LABELS[name]]
        for stage in stages:
            value = stage["metrics"].get(name)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                cells.append("-")
            elif name in ("task_perplexity", "harmful_judge_score"):
                cells.append(f"{value:.3g}")
            else:
                cells.append(f"{100 * value:.1f}%")
        rows.append(cells)
    truncated = [s["metrics"].get("truncated_prompts") for s in stages]
    if any(t and sum(t.values()) for t in truncated):  # prompts the model saw only the end of
        rows.append(["prompts truncated"] + ["-" if t is None else str(sum(t.values())) for t in truncated])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def plot_stages(stages: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Grouped bars: one group per rate metric, one bar per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in RATE_METRICS if any(n in s["metrics"] for s in stages)]
    if not names:
        return None
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(names)), 3.8))
    width = 0.8 / len(stages)
    for j, stage in enumerate(stages):
        values = [100 * stage["metrics"].get(n, math.nan) for n in names]
        xs = [i + (j - (len(stages) - 1) / 2) * width for i in range(len(names))]
        bars = ax.bar(xs, values, width, label=stage["stage"])
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    ax.set_xticks(range(len(names)), [LABELS[n] for n in names], rotation=15, ha="right", fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 110)
    ax.legend(fontsize=8)
    ax.set_title(title or "safety and utility")
    fig.tight_layout()
    return save_figure(fig, path)


#: per-category metrics plotted by :func:`plot_categories`: key -> (x axis label, file name, report files key)
CATEGORY_PLOTS = {
    "asr_by_category": ("attack success rate (%)", "eval_asr_by_category.png", "category_plot"),
    "asr_by_template": ("attack success rate (%)", "eval_asr_by_template.png", "template_plot"),
    "borderline_over_refusal_by_category": ("over-refusal, borderline prompts (%)",
                                            "eval_borderline_over_refusal_by_category.png", "borderline_category_plot"),
}


def plot_categories(stages: Sequence[dict[str, Any]], path: Path, key: str = "asr_by_category") -> Path | None:
    """Horizontal bars of a rate per category (a :data:`CATEGORY_PLOTS` key: ASR per harm category or
    per jailbreak template, over-refusal per borderline prompt type), one bar per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    categories = sorted({c for s in stages for c in s["metrics"].get(key, {})})
    if len(categories) < 2:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 0.28 * len(categories) * max(1, len(stages)) + 1.2))
    height = 0.8 / len(stages)
    for j, stage in enumerate(stages):
        values = [100 * stage["metrics"].get(key, {}).get(c, math.nan) for c in categories]
        ys = [i + (j - (len(stages) - 1) / 2) * height for i in range(len(categories))]
        ax.barh(ys, values, height, label=stage["stage"])
    ax.set_yticks(range(len(categories)), categories, fontsize=7)
    ax.set_xlabel(CATEGORY_PLOTS[key][0])
    ax.set_xlim(0, 100)
    ax.invert_yaxis()
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def write_samples(path: str | Path, samples: Sequence[dict[str, Any]]) -> Path:
    """Every prompt, answer and verdict as JSON lines (atomically)."""
    with atomic_file(path) as handle:
        for sample in samples:
            handle.write(json.dumps(sample, ensure_ascii=False) + "\n")
    return Path(path)


def write_report(output_dir: str | Path, report: dict[str, Any], samples: Sequence[dict[str, Any]] | None = None,
                 plots: bool = True) -> dict[str, Path]:
    """Write ``eval_report.json`` (+ ``samples.jsonl`` and plots); returns the paths written."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    stages = report["stages"]
    if plots:
        if plot_stages(stages, out / "eval_metrics.png", report.get("model", "")) is not None:
            paths["plot"] = out / "eval_metrics.png"
        for key, (_, filename, name) in CATEGORY_PLOTS.items():
            if plot_categories(stages, out / filename, key) is not None:
                paths[name] = out / filename
    if samples is not None:
        paths["samples"] = write_samples(out / "samples.jsonl", samples)
    # The report last: its presence means the evaluation (and everything above) is complete.
    write_json(out / "eval_report.json", {**report, "files": {k: p.name for k, p in paths.items()}})
    paths["report"] = out / "eval_report.json"
    return paths
