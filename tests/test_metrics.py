"""Evaluation metrics: hand-computed values, and exact sync across 2 gloo processes."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port

from lit_safety.metrics import (
    AttackSuccessRate,
    CategoryRate,
    MeanJudgeScore,
    MultipleChoiceAccuracy,
    OverRefusalRate,
    Perplexity,
    RefusalRate,
    TaskAccuracy,
    extract_final_answer,
)


def test_rates_match_hand_counts():
    asr = AttackSuccessRate()
    asr.update([True, False, True])
    asr.update(torch.tensor([0, 0, 1, 1]))
    assert asr.compute().item() == pytest.approx(4 / 7)
    for cls in (RefusalRate, OverRefusalRate):
        metric = cls()
        metric.update([False, True])
        assert metric.compute().item() == 0.5
    assert math.isnan(AttackSuccessRate().compute().item())


def test_mean_judge_score_and_categories():
    score = MeanJudgeScore()
    score.update([1.0, 5.0])
    score.update(torch.tensor([3.0]))
    assert score.compute().item() == pytest.approx(3.0)
    by_cat = CategoryRate(["drugs", "fraud", "weapons"])
    by_cat.update(["drugs", "fraud", "drugs"], [True, False, False])
    rates = by_cat.compute()
    assert rates["drugs"] == 0.5 and rates["fraud"] == 0.0 and math.isnan(rates["weapons"])
    with pytest.raises(KeyError, match="not declared"):
        by_cat.update(["unknown"], [True])


@pytest.mark.parametrize("text, strict, expected", [
    ("so 9 * 2 = 18.\n#### 18", True, "18"),
    ("#### 1,234", True, "1234"),
    ("#### $18.00", True, "18"),
    ("#### -3", True, "-3"),
    ("The answer is 18.", True, None),
    ("The answer is 18.", False, "18"),
    ("no number here", False, None),
    ("", True, None),
])
def test_extract_final_answer(text, strict, expected):
    assert extract_final_answer(text, strict=strict) == expected


def test_task_accuracy_gsm8k_exact_match():
    metric = TaskAccuracy()
    responses = ["16 - 3 = 13\n#### 13", "#### 12", "I think 7", "#### 1,000"]
    references = ["Janet ... \n#### 13", "#### 13", "7", "1000"]
    metric.update(responses, references)
    assert metric.compute().item() == pytest.approx(2 / 4)  # strict: "I think 7" has no "####"
    flexible = TaskAccuracy(strict=False)
    flexible.update(responses, references)
    assert flexible.compute().item() == pytest.approx(3 / 4)


def test_multiple_choice_accuracy():
    metric = MultipleChoiceAccuracy()
    metric.update(torch.tensor([[-1.0, -0.5, -3.0, -2.0], [-0.1, -2.0, -2.0, -2.0]]), [1, 3])
    assert metric.compute().item() == 0.5
    with pytest.raises(ValueError, match="batch, choices"):
        metric.update(torch.zeros(3, 4), [0, 1])


def test_perplexity_equals_exp_mean_nll():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    labels[0, :2] = -100  # prompt tokens are not scored
    metric = Perplexity()
    metric.update(logits, labels)
    shifted, targets = logits[:, :-1], labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(shifted.reshape(-1, 7), targets.reshape(-1), ignore_index=-100)
    assert metric.compute().item() == pytest.approx(math.exp(nll.item()), rel=1e-6)


# -- distributed ---------------------------------------------------------------------------------------

def _worker(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        asr = AttackSuccessRate()
        asr.update([True, False, True] if rank == 0 else [False])
        score = MeanJudgeScore()
        score.update([5.0, 1.0] if rank == 0 else [3.0, 3.0, 3.0])
        task = TaskAccuracy()
        task.update(["#### 1"] if rank == 0 else ["#### 2", "#### 3"], ["1"] if rank == 0 else ["2", "4"])
        by_cat = CategoryRate(["a", "b"])
        by_cat.update(["a"] if rank == 0 else ["a", "b"], [True] if rank == 0 else [False, True])
        empty = RefusalRate()  # never updated on any rank
        out[rank] = {"asr": asr.compute().item(), "score": score.compute().item(), "task": task.compute().item(),
                     "by_cat": by_cat.compute(), "empty": empty.compute().item()}
    finally:
        dist.destroy_process_group()


def test_metrics_sync_across_two_processes():
    port = free_port()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, port, out), nprocs=2, join=True)
        results = dict(out)
    for rank in (0, 1):
        r = results[rank]
        assert r["asr"] == pytest.approx(2 / 4)
        assert r["score"] == pytest.approx(15 / 5)
        assert r["task"] == pytest.approx(2 / 3)
        assert r["by_cat"] == {"a": 0.5, "b": 1.0}
        assert math.isnan(r["empty"])
