"""``SafetyEvalDataModule``: the prompts of an evaluation, one test dataloader per set."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader

from lit_safety.evaluation.suite import ORGANISM, EvalRecord, EvalSuite, load_suite, shard_records
from lit_safety.parallel import PreShardedSampler


def _as_list(batch: list[EvalRecord]) -> list[EvalRecord]:
    return batch


class SafetyEvalDataModule(L.LightningDataModule):
    """Harmful, jailbreak, benign, task and multiple-choice prompts for ``lit-safety test``.

    A source is a CSV/JSON/JSONL file, a `datasets` hub id, ``organism`` (the embedded organisms'
    held-out prompts) or null (skip the set). Everything is read and checked in ``setup``, before
    the model is loaded.

    Args:
        harmful_data: harmful requests (AdvBench ``goal``, HarmBench ``Behavior``, or ``prompt_field``).
        benign_data: harmless instructions for the over-refusal rate.
        task_data: GSM8K-style JSONL (``question`` + ``answer`` ending in "#### N").
        mc_data: MMLU-format CSV, a directory of them, or a glob (question, choice0..3, answer).
        jailbreak_templates: file of templates with a ``{prompt}`` placeholder (.txt = one template;
            JSON list of strings; CSV/JSON/JSONL with a ``template`` column and optional ``name``);
            every harmful prompt is also asked inside every template.
        prompt_field: column of the harmful prompts (default: the first of prompt, instruction,
            goal, Behavior, question ...).
        benign_prompt_field: column of the benign prompts.
        category_field: column of the harm category (default: category / SemanticCategory if present).
        task_prompt_field: column of the task questions.
        task_answer_field: column of the task reference answers.
        num_harmful: at most this many harmful prompts (null: all).
        num_benign: at most this many benign prompts.
        num_task: at most this many task problems.
        num_mc: at most this many multiple-choice questions per file.
        num_templates: at most this many jailbreak templates.
        split: split of `datasets` hub ids.
        batch_size: prompts per test step (and per ``generate`` call).
    """

    def __init__(
        self,
        harmful_data: str | None = ORGANISM,
        benign_data: str | None = ORGANISM,
        task_data: str | None = ORGANISM,
        mc_data: str | None = None,
        jailbreak_templates: str | None = None,
        prompt_field: str | None = None,
        benign_prompt_field: str | None = None,
        category_field: str | None = None,
        task_prompt_field: str | None = None,
        task_answer_field: str | None = None,
        num_harmful: int | None = 200,
        num_benign: int | None = 200,
        num_task: int | None = 200,
        num_mc: int | None = None,
        num_templates: int | None = None,
        split: str = "train",
        batch_size: int = 32,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.save_hyperparameters()
        self.options = dict(
            harmful_data=harmful_data, benign_data=benign_data, task_data=task_data, mc_data=mc_data,
            jailbreak_templates=jailbreak_templates, prompt_field=prompt_field, benign_prompt_field=benign_prompt_field,
            category_field=category_field, task_prompt_field=task_prompt_field, task_answer_field=task_answer_field,
            num_harmful=num_harmful, num_benign=num_benign, num_task=num_task, num_mc=num_mc,
            num_templates=num_templates, split=split)
        self.batch_size = batch_size
        self.suite: EvalSuite | None = None

    def load(self) -> EvalSuite:
        if self.suite is None:
            self.suite = load_suite(**self.options)
        return self.suite

    def setup(self, stage: str | None = None) -> None:
        self.load()

    def test_dataloader(self) -> list[DataLoader]:
        suite = self.load()
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        loaders = []
        for _, records in suite:
            shard = shard_records(records, rank, world)
            loaders.append(DataLoader(shard, batch_size=self.batch_size, sampler=PreShardedSampler(shard),
                                      collate_fn=_as_list))
        return loaders
