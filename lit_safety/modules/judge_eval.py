"""``JudgeEvalModule``: ``lit-safety test --config configs/judge_eval.yaml`` validates a judge
against human labels.

Any judge (keyword, guard, classifier, API) rates every (prompt, response) pair of a labelled file
(``JudgeDataModule``, e.g. GPTFuzz's 6,160 labelled responses); the verdicts are counted against
the labels in a :class:`~lit_safety.evaluation.judge_agreement.JudgeAgreement` metric (integer
states summed across ranks, so a DDP run equals a single process exactly; the padding copies that
keep ranks in step have weight 0 and are not judged). At the end: accuracy, precision / recall /
F1 of the jailbroken class, Cohen's kappa, the confusion matrix, predicted vs true ASR and, for
judges whose score is a probability (guard, classifier), calibration bins; logged as
``judge/<metric>``, printed as a table and written to ``output_dir`` as ``judge_report.json`` +
``judge_confusion.png`` (+ ``judge_reliability.png``), atomically, once the evaluation is complete.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from lit_safety.evaluation.judge_agreement import (JudgeAgreement, build_judge_report, format_judge_table,
                                                   logged_judge_metrics, write_judge_report)
from lit_safety.io import check_parent_exists
from lit_safety.judges.base import Judge
from lit_safety.judges.keyword import KeywordJudge


def unpack_batch(batch: Sequence[Any]) -> tuple[list[str], list[str], list[int], list[float]]:
    """(prompts, responses, labels, weights) of a batch of records (``JudgeDataModule``'s
    ``WeightedResponse``, or anything with ``prompt``, ``response``, ``label`` and an optional
    ``weight``, as attributes or keys; weight 0 = a padding copy)."""
    def get(record: Any, name: str, default: Any = None) -> Any:
        value = record.get(name, default) if isinstance(record, Mapping) else getattr(record, name, default)
        if value is None:
            raise TypeError(f"a judge-validation record needs {name!r}, got {record!r}")
        return value

    prompts = [str(get(r, "prompt")) for r in batch]
    responses = [str(get(r, "response")) for r in batch]
    labels = [int(get(r, "label")) for r in batch]
    weights = [float(get(r, "weight", 1.0)) for r in batch]
    return prompts, responses, labels, weights


def data_description(datamodule: Any) -> dict[str, Any]:
    """The labelled data of a report: the data module's hyperparameters (file, fields, ...), the
    label file's SHA-256 and the number of records (``JudgeDataModule``; what other modules have)."""
    data = dict(getattr(datamodule, "hparams", {}) or {})
    if hasattr(datamodule, "data_sha256"):
        data["sha256"] = datamodule.data_sha256
    if hasattr(datamodule, "records"):
        data["n_records"] = len(datamodule.records())
    questions = getattr(datamodule, "questions_path", None)
    if questions is not None:
        data["questions"] = str(questions)
    return data


class JudgeEvalModule(L.LightningModule):
    """Validate a judge against human labels (``lit-safety test --config configs/judge_eval.yaml``).

    Args:
        judge: the judge under test (default: the GCG refusal-keyword judge). E.g.
            ``{class_path: lit_safety.judges.ClassifierJudge, init_args: {model: judge-minilm,
            unsafe_label: jailbroken, pair: true}}`` (or a directory written by judge training),
            ``lit_safety.judges.GuardJudge``, ``lit_safety.judges.ApiJudge``.
        output_dir: where judge_report.json and the plots go.
        threshold: null: the judge's own verdicts (``Verdict.jailbroken``); a number: jailbroken
            when ``Verdict.score >= threshold`` (e.g. another operating point of a classifier).
        calibration_bins: equal-width bins over [0, 1] of the reliability table and plot (judges
            whose score is a probability: guard, classifier).
        plots: write the PNG plots.
    """

    def __init__(self, judge: Judge | None = None, output_dir: str = "outputs/judge_eval",
                 threshold: float | None = None, calibration_bins: int = 10, plots: bool = True) -> None:
        super().__init__()
        if calibration_bins < 1:
            raise ValueError(f"calibration_bins must be >= 1, got {calibration_bins}")
        self.save_hyperparameters(ignore=["judge"])
        self.judge = judge if judge is not None else KeywordJudge()
        self.output_dir = str(check_parent_exists(output_dir, "output_dir"))
        self.threshold = threshold
        self.plots = plots
        self.agreement = JudgeAgreement(calibration=bool(getattr(self.judge, "probability_scores", False)),
                                        n_bins=calibration_bins)
        self.report: dict[str, Any] = {}
        """The last judge_report.json (on global rank 0; the metrics on every rank in ``report['metrics']``)."""
        self._started = 0.0

    def setup(self, stage: str) -> None:
        if stage != "test":
            raise RuntimeError(f"JudgeEvalModule only evaluates: run `lit-safety test`, not {stage!r}")
        self.judge.setup()  # a missing judge model / endpoint fails before any data is judged

    def on_test_start(self) -> None:
        self.agreement.reset()
        self._started = time.perf_counter()

    def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
        return batch  # text: the judge tokenizes on its own device

    def verdicts(self, prompts: Sequence[str], responses: Sequence[str]) -> tuple[list[bool], list[float]]:
        """The judge's (jailbroken, score) for each pair, with ``threshold`` applied when set."""
        verdicts = self.judge.judge_batch(list(prompts), list(responses))
        scores = [float(v.score) for v in verdicts]
        if self.threshold is None:
            return [bool(v.jailbroken) for v in verdicts], scores
        return [s >= self.threshold for s in scores], scores

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        prompts, responses, labels, weights = unpack_batch(batch)
        counted = [i for i, w in enumerate(weights) if w != 0]  # padding copies (weight 0) are not judged
        if not counted:
            return
        jailbroken, scores = self.verdicts([prompts[i] for i in counted], [responses[i] for i in counted])
        self.agreement.update(jailbroken, [labels[i] for i in counted], scores=scores,
                              weights=[weights[i] for i in counted])

    def on_test_epoch_end(self) -> None:
        result = self.agreement.compute()  # synced over ranks (a collective: every rank)
        self.report = {"metrics": result["metrics"]}
        if not self.trainer.is_global_zero:
            return
        data = data_description(getattr(self.trainer, "datamodule", None))
        report = build_judge_report(result, judge=self.judge.describe(), data=data, threshold=self.threshold,
                                    world_size=self.trainer.world_size, seconds=time.perf_counter() - self._started)
        if self.logger is not None:
            self.logger.log_metrics(logged_judge_metrics(report), step=0)
        paths = write_judge_report(self.output_dir, report, plots=self.plots)
        self.report = report
        rank_zero_info("\n" + format_judge_table(report) + f"\n\nreport: {paths['report']}")

    def configure_optimizers(self) -> Any:
        return None
