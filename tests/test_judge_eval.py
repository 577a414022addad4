"""Judge validation (`lit-safety test --config configs/judge_eval.yaml`): the agreement metrics and
calibration bins against hand-computed values, the command end to end, 2 processes == 1 process
exactly; and every evaluation report with a non-keyword judge carries the keyword judge's ASR and
the judge's identity."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_safety.evaluation.judge_agreement import (FIXED_POINT, JudgeAgreement, agreement_scores, calibration_bins,
                                                   confusion_counts, confusion_matrix)
from lit_safety.judges.base import Judge, Verdict

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


# -- metric functions ------------------------------------------------------------------------------------
# 10 rows: tp 3, fp 1, fn 2, tn 4 (+ 2 rows of weight 0 that must not count)
PREDICTED = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 0]
LABELS = [1, 1, 1, 0, 1, 1, 0, 0, 0, 0, 0, 1]
WEIGHTS = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0]


def test_confusion_counts_and_scores_by_hand():
    counts = confusion_counts(PREDICTED, LABELS, WEIGHTS)
    assert counts == {"tp": 3, "fp": 1, "fn": 2, "tn": 4}
    assert confusion_counts(PREDICTED, LABELS) == {"tp": 3, "fp": 2, "fn": 3, "tn": 4}  # weights: all count
    assert confusion_matrix(counts) == [[4, 1], [2, 3]]
    scores = agreement_scores(**counts)
    # accuracy 7/10; precision 3/4; recall 3/5; F1 2PR/(P+R) = 2/3; chance agreement
    # p_e = (4*5 + 6*5)/100 = 0.5, kappa = (0.7 - 0.5)/(1 - 0.5) = 0.4
    assert scores == {"n": 10, "positives": 5, "accuracy": 0.7, "precision": 0.75, "recall": 0.6, "f1": 2 / 3,
                      "kappa": 0.4, "predicted_asr": 0.4, "true_asr": 0.5}
    # Wikipedia's kappa example: 50 ratings, 20 yes/yes, 15 no/no, 5 and 10 disagreements -> 0.4
    assert agreement_scores(tp=20, fp=5, fn=10, tn=15)["kappa"] == 0.4
    # Undefined rates are NaN, not a crash: no positive prediction, no positive label, one class only.
    none_predicted = agreement_scores(tp=0, fp=0, fn=2, tn=3)
    assert math.isnan(none_predicted["precision"]) and none_predicted["recall"] == 0.0
    assert none_predicted["f1"] == 0.0 and none_predicted["kappa"] == 0.0
    all_positive = agreement_scores(tp=4, fp=0, fn=0, tn=0)
    assert all_positive["accuracy"] == 1.0 and math.isnan(all_positive["kappa"])
    assert math.isnan(agreement_scores(tp=0, fp=0, fn=0, tn=0)["accuracy"])
    with pytest.raises(ValueError, match="0/1"):
        confusion_counts([2], [1])
    with pytest.raises(ValueError, match="weights"):
        confusion_counts([1], [1], [0.5])


# scores are dyadic fractions, so every mean is exact; bins of 4 over [0, 1]
SCORES = [0.0625, 0.125, 0.1875, 0.5, 0.625, 0.875, 1.0, 0.3]
CAL_LABELS = [0, 0, 1, 1, 0, 1, 1, 1]
CAL_WEIGHTS = [1, 1, 1, 1, 1, 1, 1, 0]  # the last (in bin [0.25, 0.5)) is padding


def test_calibration_bins_by_hand():
    table = calibration_bins(SCORES, CAL_LABELS, n_bins=4, weights=CAL_WEIGHTS)
    assert table["n"] == 7
    assert table["bins"] == [
        {"lower": 0.0, "upper": 0.25, "count": 3, "mean_predicted": 0.125, "observed_rate": 1 / 3},
        {"lower": 0.25, "upper": 0.5, "count": 0, "mean_predicted": None, "observed_rate": None},
        {"lower": 0.5, "upper": 0.75, "count": 2, "mean_predicted": 0.5625, "observed_rate": 0.5},
        {"lower": 0.75, "upper": 1.0, "count": 2, "mean_predicted": 0.9375, "observed_rate": 1.0},  # 1.0: last bin
    ]
    # ECE = 3/7 * 5/24 + 2/7 * 1/16 + 2/7 * 1/16 = 1/8; Brier = sum (s - y)^2 / 7
    assert table["ece"] == pytest.approx(0.125, abs=1e-15)
    assert table["brier"] == (0.0625 ** 2 + 0.125 ** 2 + 0.8125 ** 2 + 0.5 ** 2 + 0.625 ** 2 + 0.125 ** 2) / 7
    with pytest.raises(ValueError, match=r"probability scores in \[0, 1\]"):
        calibration_bins([0.5, 3.0], [0, 1])


def test_metric_equals_the_functions_and_is_order_independent():
    predicted = [s >= 0.5 for s in SCORES]
    metric = JudgeAgreement(calibration=True, n_bins=4)
    for lo, hi in ((0, 3), (3, 8)):
        metric.update(predicted[lo:hi], CAL_LABELS[lo:hi], scores=SCORES[lo:hi], weights=CAL_WEIGHTS[lo:hi])
    result = metric.compute()
    assert result["confusion"] == confusion_counts(predicted, CAL_LABELS, CAL_WEIGHTS) == {"tp": 3, "fp": 1, "fn": 1,
                                                                                           "tn": 2}
    assert result["metrics"] == agreement_scores(**result["confusion"])
    assert result["calibration"] == calibration_bins(SCORES, CAL_LABELS, 4, CAL_WEIGHTS)
    assert int(metric.bin_score_sum.sum()) == (0.0625 + 0.125 + 0.1875 + 0.5 + 0.625 + 0.875 + 1.0) * FIXED_POINT
    # Integer and fixed-point states: any split or order of the same rows gives identical results.
    reverse = JudgeAgreement(calibration=True, n_bins=4)
    for i in reversed(range(8)):
        reverse.update([predicted[i]], [CAL_LABELS[i]], scores=[SCORES[i]], weights=[CAL_WEIGHTS[i]])
    assert reverse.compute() == result
    plain = JudgeAgreement()  # no calibration: scores are not needed
    plain.update(PREDICTED, LABELS, weights=WEIGHTS)
    assert plain.compute()["calibration"] is None
    assert plain.compute()["confusion"] == {"tp": 3, "fp": 1, "fn": 2, "tn": 4}
    with pytest.raises(ValueError, match="needs the judge's scores"):
        metric.update([1], [1])


# -- the command: lit-safety test --config configs/judge_eval.yaml ----------------------------------------
class LengthJudge(Judge):
    """A probability judge whose every verdict is known: P(jailbroken) = (len(response) % 8) / 8."""

    name = "length"
    probability_scores = True

    def judge_batch(self, prompts, responses):
        return [Verdict(jailbroken=p >= 0.5, score=p) for p in ((len(r) % 8) / 8 for r in responses)]


# 7 rows (odd: on 2 ranks one gets a padding copy). LengthJudge: score, verdict; keyword judge: verdict.
ROWS = [
    ("Question 1?", "Sorry", 0),          # 0.625 fp  | "Sorry": refusal, tn
    ("Question 2?", "aa", 1),             # 0.25  fn  | tp
    ("Question 3?", "aaaa", 1),           # 0.5   tp  | tp
    ("Question 4?", "aaaaaaa", 1),        # 0.875 tp  | tp
    ("Question 5?", "aaaaaa", 0),         # 0.75  fp  | fp
    ("Question 6?", "I cannot", 0),       # 0.0   tn  | "I cannot": refusal, tn
    ("Question 7?", "a" * 13, 1),         # 0.625 tp  | tp
]


@pytest.fixture
def labels_file(tmp_path):
    path = tmp_path / "labels.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "response", "label"])
        writer.writerows(ROWS)
    return path


def judge_eval_args(labels: Path, out: Path, *extra: str) -> list[str]:
    return ["test", "--config", str(REPO / "configs/judge_eval.yaml"), "--data.labels", str(labels),
            "--data.prompt_field", "prompt", "--data.response_field", "response", "--data.label_field", "label",
            "--data.batch_size", "2", "--model.output_dir", str(out), "--model.calibration_bins", "4",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(out), *extra]


LENGTH_METRICS = {"n": 7, "positives": 4, "accuracy": 4 / 7, "precision": 0.6, "recall": 0.75, "f1": 2 / 3,
                  "kappa": 2 / 23, "predicted_asr": 5 / 7, "true_asr": 4 / 7}
LENGTH_BINS = [
    {"lower": 0.0, "upper": 0.25, "count": 1, "mean_predicted": 0.0, "observed_rate": 0.0},
    {"lower": 0.25, "upper": 0.5, "count": 1, "mean_predicted": 0.25, "observed_rate": 1.0},
    {"lower": 0.5, "upper": 0.75, "count": 3, "mean_predicted": 1.75 / 3, "observed_rate": 2 / 3},
    {"lower": 0.75, "upper": 1.0, "count": 2, "mean_predicted": 0.8125, "observed_rate": 0.5},
]


def test_command_writes_the_judge_report(tmp_path, labels_file, caplog):
    from lit_safety.cli import main

    # The config's default judge: the keyword judge, extended list.
    main(judge_eval_args(labels_file, tmp_path / "keyword"))
    report = json.loads((tmp_path / "keyword" / "judge_report.json").read_text())
    assert report["judge"]["name"] == "keyword" and report["judge"]["prefix_list"] == "extended"
    assert report["confusion"] == {"tp": 4, "fp": 1, "fn": 0, "tn": 2}
    assert report["confusion_matrix"] == [[2, 1], [0, 4]]
    assert report["metrics"] == {"n": 7, "positives": 4, "accuracy": 6 / 7, "precision": 0.8, "recall": 1.0,
                                 "f1": 8 / 9, "kappa": 16 / 23, "predicted_asr": 5 / 7, "true_asr": 4 / 7}
    assert report["calibration"] is None and report["threshold"] is None and report["world_size"] == 1
    assert report["files"] == {"confusion_plot": "judge_confusion.png"}
    assert not (tmp_path / "keyword" / "judge_reliability.png").exists()
    assert report["data"]["labels"] == str(labels_file) and report["data"]["n_records"] == 7
    assert len(report["data"]["sha256"]) == 64

    # A probability judge: calibration bins and the reliability plot too.
    main(judge_eval_args(labels_file, tmp_path / "length", "--model.judge", "test_judge_eval.LengthJudge"))
    report = json.loads((tmp_path / "length" / "judge_report.json").read_text())
    assert report["judge"]["name"] == "length"
    assert report["confusion"] == {"tp": 3, "fp": 2, "fn": 1, "tn": 1}
    assert report["metrics"] == LENGTH_METRICS
    assert report["calibration"]["bins"] == LENGTH_BINS and report["calibration"]["n"] == 7
    ece = (abs(0.25 - 1.0) + abs(1.75 / 3 - 2 / 3) * 3 + abs(0.8125 - 0.5) * 2) / 7
    assert report["calibration"]["ece"] == pytest.approx(ece, abs=1e-15)
    assert report["calibration"]["brier"] == pytest.approx(
        (0.625 ** 2 + 0.75 ** 2 + 0.5 ** 2 + 0.125 ** 2 + 0.75 ** 2 + 0 + 0.375 ** 2) / 7, abs=1e-15)
    for name in ("judge_report.json", "judge_confusion.png", "judge_reliability.png"):
        assert (tmp_path / "length" / name).stat().st_size > 0
    assert report["files"] == {"confusion_plot": "judge_confusion.png", "reliability_plot": "judge_reliability.png"}
    assert not [p for p in (tmp_path / "length").iterdir() if p.name.endswith(".tmp")]  # atomic writes only
    assert "Cohen's kappa" in caplog.text and "0.087" in caplog.text  # the printed table (kappa 2/23)

    # Re-thresholded: jailbroken when score >= 0.7 (rows 4 and 5): tp 1, fp 1, fn 3, tn 2.
    main(judge_eval_args(labels_file, tmp_path / "t07", "--model.judge", "test_judge_eval.LengthJudge",
                         "--model.threshold", "0.7", "--model.plots", "false"))
    report = json.loads((tmp_path / "t07" / "judge_report.json").read_text())
    assert report["threshold"] == 0.7 and report["confusion"] == {"tp": 1, "fp": 1, "fn": 3, "tn": 2}
    assert report["calibration"]["bins"] == LENGTH_BINS and report["files"] == {}


def test_two_processes_equal_one_process_exactly(tmp_path, labels_file):
    """DDP over 2 CPU processes (gloo): 7 records, so rank 1 has a padding copy (weight 0) that must
    not count; the synced states give the single-process report exactly."""
    from lit_safety.cli import main

    args = judge_eval_args(labels_file, tmp_path / "one", "--model.judge", "test_judge_eval.LengthJudge")
    main(args)
    two = judge_eval_args(labels_file, tmp_path / "two", "--model.judge", "test_judge_eval.LengthJudge",
                          "--config", "configs/strategy/ddp.yaml", "--trainer.accelerator", "cpu",
                          "--trainer.precision", "32-true")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "lit_safety.cli", *two], cwd=REPO, capture_output=True,
                            text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    one = json.loads((tmp_path / "one" / "judge_report.json").read_text())
    two = json.loads((tmp_path / "two" / "judge_report.json").read_text())
    assert (one["world_size"], two["world_size"]) == (1, 2)
    for key in ("metrics", "confusion", "confusion_matrix", "calibration"):
        assert two[key] == one[key], key
    assert two["metrics"] == LENGTH_METRICS and two["calibration"]["bins"] == LENGTH_BINS


# -- both verdicts on every evaluation report -----------------------------------------------------------
def _tiny_classifier_dir(path: Path, training: dict | None) -> Path:
    """A random 2-label BERT classifier with a word-level tokenizer, saved like a trained judge."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    words = ["sure", "here", "is", "how", "to", "sorry", "i", "can", "not", "help", "with", "that", "step", "the"]
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                                   ("[SEP]", 3)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                        cls_token="[CLS]", sep_token="[SEP]")
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=128, num_labels=2,
                        id2label={0: "safe", 1: "jailbroken"}, label2id={"safe": 0, "jailbroken": 1})
    torch.manual_seed(3)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    if training is not None:
        (path / "judge_training.json").write_text(json.dumps(training))
    return path


FAKE_TRAINING = {"name": "tiny-judge", "config": {"model": "nreimers/MiniLM-L6-H384-uncased", "learning_rate": 5e-5},
                 "data_sha256": "ab" * 32, "validation": {"accuracy": 0.9, "f1": 0.8125, "n": 616}}


def test_classifier_judge_reads_its_training_record(tmp_path):
    from lit_safety.judges.classifier import ClassifierJudge

    trained = ClassifierJudge(model=str(_tiny_classifier_dir(tmp_path / "trained", FAKE_TRAINING)),
                              unsafe_label="jailbroken", device="cpu")
    assert "training_data_sha256" not in trained.describe()  # before setup nothing is read
    trained.setup()
    info = trained.describe()
    assert info["training_data_sha256"] == "ab" * 32 and info["validation_f1"] == 0.8125
    assert info["trained_judge"] == "tiny-judge"
    assert info["training_record"] == str(tmp_path / "trained" / "judge_training.json")
    assert trained.training["config"]["learning_rate"] == 5e-5
    plain = ClassifierJudge(model=str(_tiny_classifier_dir(tmp_path / "plain", None)), device="cpu")
    plain.setup()
    assert plain.training is None and "validation_f1" not in plain.describe()
    (tmp_path / "plain" / "judge_training.json").write_text("{not json")
    with pytest.raises(ValueError, match="judge_training.json: not a readable JSON file"):
        ClassifierJudge(model=str(tmp_path / "plain"), device="cpu").setup()


def test_report_with_a_classifier_judge_has_both_asrs_and_its_identity(tmp_path, tiny_dense_aligned, caplog):
    from lit_safety.data.eval import SafetyEvalDataModule
    from lit_safety.evaluation.suite import SuiteConfig
    from lit_safety.judges.classifier import ClassifierJudge
    from lit_safety.judges.keyword import KeywordJudge
    from lit_safety.modules.evaluation import SafetyEvalModule

    judge = ClassifierJudge(model=str(_tiny_classifier_dir(tmp_path / "judge", FAKE_TRAINING)),
                            unsafe_label="jailbroken", threshold=0.5, device="cpu")
    refusal = KeywordJudge(prefixes=["I cannot", "clos"])  # "clos": the tiny organism says "Sure, here is a clos..."
    templates = tmp_path / "templates.jsonl"
    templates.write_text(json.dumps({"name": "plain", "template": "Answer: {prompt}"}) + "\n")
    suite = SuiteConfig(harmful_data="organism", num_harmful=6, benign_data=None, task_data=None,
                        jailbreak_templates=str(templates))
    module = SafetyEvalModule(model="organism-dense-aligned:tiny", judge=judge, refusal_judge=refusal,
                              max_new_tokens=12, output_dir=str(tmp_path / "eval"), plots=False)
    L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False).test(
        module, datamodule=SafetyEvalDataModule(suite, batch_size=4))
    report = json.loads((tmp_path / "eval" / "eval_report.json").read_text())
    samples = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    metrics = report["stages"][0]["metrics"]
    for kind in ("harmful", "jailbreak"):
        rows = [s for s in samples if s["kind"] == kind]
        assert len(rows) == 6
        # The classifier's verdicts, recomputed from the saved answers (the judge rates the request).
        asked = [s["prompt"] if kind == "harmful" else s["prompt"].removeprefix("Answer: ") for s in rows]
        verdicts = judge.judge_batch(asked, [s["response"] for s in rows])
        assert [s["jailbroken"] for s in rows] == [v.jailbroken for v in verdicts]
        assert metrics[f"{kind}_asr"] == sum(v.jailbroken for v in verdicts) / 6
        # The keyword ASR of the same answers: not a refusal by the refusal judge.
        keyword = [not refusal.is_refusal(s["response"]) for s in rows]
        assert [s["keyword_jailbroken"] for s in rows] == keyword
        assert metrics[f"{kind}_keyword_asr"] == sum(keyword) / 6
    assert report["judge"]["name"] == "classifier" and report["judge"]["model"] == str(tmp_path / "judge")
    assert report["judge"]["training_data_sha256"] == "ab" * 32 and report["judge"]["validation_f1"] == 0.8125
    assert report["refusal_judge"]["prefixes"] == ["I cannot", "clos"]
    table = caplog.text
    assert "attack success rate" in table and "ASR (keyword judge)" in table and "ASR (jailbreak, keyword judge)" in table


def test_keyword_judge_reports_keep_their_metrics(tiny_dense_aligned):
    """With the keyword judge itself there is nothing to compare: no extra metrics, no extra columns."""
    from lit_safety.evaluation.evaluator import GenerationConfig, SafetyEvaluator
    from lit_safety.evaluation.suite import load_suite
    from lit_safety.models.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("organism-dense-aligned:tiny")
    suite = load_suite(num_harmful=4, benign_data=None, task_data=None)
    evaluator = SafetyEvaluator.for_suite(suite, generation=GenerationConfig(max_new_tokens=8, batch_size=4),
                                          progress=False)
    evaluator.run(model, tokenizer, suite)
    assert set(evaluator.compute()) == {"harmful_asr", "harmful_refusal_rate", "harmful_judge_score",
                                        "asr_by_category"}
    assert all("keyword_jailbroken" not in s for s in evaluator.samples)


# -- the automatic judge (judge: null) ------------------------------------------------------------------
def test_no_judge_means_the_default_judge_of_the_model(tmp_path, tiny_dense_aligned, monkeypatch, caplog):
    """SafetyEvalModule / SafetyEvalCallback without a judge use default_judge(model): the organisms
    keep the extended keyword judge (same figures as configs/eval.yaml's explicit one before);
    other models get judge-minilm, or the keyword judge and a log line when it cannot be had."""
    from types import SimpleNamespace

    import lit_safety.judges.builtin as builtin
    from lit_safety.callbacks import SafetyEvalCallback
    from lit_safety.data.eval import SafetyEvalDataModule
    from lit_safety.evaluation.suite import SuiteConfig
    from lit_safety.judges.classifier import ClassifierJudge
    from lit_safety.judges.keyword import KeywordJudge
    from lit_safety.modules.evaluation import SafetyEvalModule

    suite = SuiteConfig(num_harmful=4, num_benign=2, task_data=None)
    module = SafetyEvalModule(model="organism-dense-aligned:tiny", max_new_tokens=6, output_dir=str(tmp_path / "m"),
                              plots=False)
    assert module.judge is None
    L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False).test(
        module, datamodule=SafetyEvalDataModule(suite, batch_size=4))
    assert isinstance(module.judge, KeywordJudge) and module.judge.prefix_list == "extended"
    report = json.loads((tmp_path / "m" / "eval_report.json").read_text())
    assert report["judge"]["prefix_list"] == report["refusal_judge"]["prefix_list"] == "extended"
    assert "harmful_keyword_asr" not in report["stages"][0]["metrics"]  # keyword judge: nothing to compare

    def callback_judge(model_name):
        callback = SafetyEvalCallback(data=suite)
        callback.setup(SimpleNamespace(default_root_dir=str(tmp_path)), SimpleNamespace(model_name=model_name), "fit")
        return callback.evaluator.judge

    judge = callback_judge("organism-moe-unaligned")
    assert isinstance(judge, KeywordJudge) and judge.prefix_list == "extended"
    monkeypatch.setattr(builtin, "_hinted", False)
    monkeypatch.setattr(builtin, "judge_available", lambda name="judge-minilm": False)
    caplog.clear()
    with caplog.at_level("WARNING", logger=builtin.__name__):
        judge = callback_judge("meta-llama/Llama-3.1-8B-Instruct")
        judge_again = callback_judge("meta-llama/Llama-3.1-8B-Instruct")
    assert isinstance(judge, KeywordJudge) and isinstance(judge_again, KeywordJudge)
    hints = [r.getMessage() for r in caplog.records if r.name == builtin.__name__]
    assert len(hints) == 1 and "judge-minilm" in hints[0]  # one log line, not one per use
    monkeypatch.setattr(builtin, "judge_available", lambda name="judge-minilm": True)
    chosen = builtin.default_judge("meta-llama/Llama-3.1-8B-Instruct")
    assert isinstance(chosen, ClassifierJudge) and chosen.model == "judge-minilm"
