"""``SafetyEvalDataModule``: the prompts of an evaluation, one test dataloader per set, this rank's share."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader

from lit_safety.data.files import check_counts
from lit_safety.evaluation.suite import EvalRecord, EvalSuite, SuiteConfig, shard_records
from lit_safety.io import as_config, config_dict
from lit_safety.parallel import PreShardedSampler


def _as_list(batch: list[EvalRecord]) -> list[EvalRecord]:
    return batch


class SafetyEvalDataModule(L.LightningDataModule):
    """Harmful, jailbreak, benign, task and multiple-choice prompts for ``lit-safety test``.

    Everything is read and checked in ``setup``, before the model is loaded. Each rank's loaders
    hold its shard of every set (:func:`shard_records`: equal lengths, padding repeats that are
    never counted), so ranks run the same number of test steps.

    Args:
        suite: which prompts (sources, fields, limits); ``--data.suite.<option>`` on the command line.
        batch_size: prompts per test step (and per ``generate`` call).
    """

    def __init__(self, suite: SuiteConfig = SuiteConfig(), batch_size: int = 32) -> None:
        super().__init__()
        check_counts(batch_size=batch_size)
        suite = as_config(SuiteConfig, suite, "suite")
        self.save_hyperparameters({"suite": config_dict(suite), "batch_size": batch_size})
        self.config = suite
        self.batch_size = batch_size
        self._suite: EvalSuite | None = None

    def load(self) -> EvalSuite:
        """The loaded suite (read once)."""
        if self._suite is None:
            self._suite = self.config.load()
        return self._suite

    def setup(self, stage: str | None = None) -> None:
        self.load()

    def test_dataloader(self) -> list[DataLoader]:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        loaders = []
        for _, records in self.load():
            shard = shard_records(records, rank, world)
            loaders.append(DataLoader(shard, batch_size=self.batch_size, sampler=PreShardedSampler(shard),
                                      collate_fn=_as_list))
        return loaders
