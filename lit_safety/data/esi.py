"""Harmful prompts for ESI scoring, batched for the chosen safety objective.

``refusal`` and ``compliance`` batches hold prompt + target tokens (right padded, labels on the
target only); ``judge`` batches hold the left-padded prompts the model will answer. Every batch
also carries the prompt strings under ``"prompts"``, and, when its examples have one, a per-example
``"weight"`` (1.0, or 0.0 for the padding copies that keep distributed ranks in step).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import partial
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from lit_safety.data.chat import collate_right_padded, encode_chat, render_prompt
from lit_safety.data.files import DataError, check_counts, pick_field, prompt_key, read_records, record_prompts
from lit_safety.models.loading import load_tokenizer
from lit_safety.parallel import PreShardedSampler, pad_shard_indices
from lit_safety.registry import builtin_corpus

DEFAULT_REFUSAL = "I'm sorry, but I can't help with that."
TARGET_FIELDS = {"refusal": ("refusal", "output", "response"), "compliance": ("target", "compliance", "response")}


def _target_kind(objective: Any) -> str | None:
    return objective if isinstance(objective, str) and objective != "judge" else getattr(objective, "target", None)


def collate_examples(examples: Sequence[dict[str, Any]], *, pad_id: int) -> dict[str, Any]:
    """Batch pre-encoded examples; keeps prompt strings alongside the tensors."""
    if "labels" in examples[0]:
        batch = collate_right_padded(examples, pad_id)
    else:  # judge: prompts only, left padded for generation
        width = max(len(e["input_ids"]) for e in examples)
        input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, e in enumerate(examples):
            n = len(e["input_ids"])
            input_ids[row, width - n :] = torch.tensor(e["input_ids"])
            attention_mask[row, width - n :] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    batch["prompts"] = [e["prompt"] for e in examples]
    if "weight" in examples[0]:
        batch["weight"] = torch.tensor([float(e["weight"]) for e in examples])
    return batch


def encode_examples(tokenizer: Any, prompts: Sequence[str], targets: Sequence[str] | None, objective: Any,
                    max_length: int) -> list[dict[str, Any]]:
    kind = _target_kind(objective)
    if kind is None:
        return [{"prompt": p, "input_ids": tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"]}
                for p in prompts]
    if targets is None:
        if kind == "compliance":
            raise DataError("the compliance objective needs harmful targets (e.g. AdvBench's 'target' column)")
        targets = [DEFAULT_REFUSAL] * len(prompts)
    if len(targets) != len(prompts):
        raise DataError(f"{len(prompts)} prompts but {len(targets)} targets")
    return [{"prompt": p, **encode_chat(tokenizer, p, t, max_length=max_length)} for p, t in zip(prompts, targets)]


def prompt_batches(tokenizer: Any, prompts: Sequence[str], targets: Sequence[str] | None = None, *,
                   objective: Any = "refusal", batch_size: int = 8, max_length: int = 256) -> list[dict[str, Any]]:
    """All batches of ``prompts`` at once (the function API's data path)."""
    examples = encode_examples(tokenizer, prompts, targets, objective, max_length)
    collate = partial(collate_examples, pad_id=tokenizer.pad_token_id)
    return [collate(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)]


class HarmfulPromptsDataModule(L.LightningDataModule):
    """Harmful prompts (and targets) for ESI scoring.

    Args:
        tokenizer: the model whose tokenizer to use (linked from ``model.init_args.model``).
        data_path: CSV/JSON/JSONL file or `datasets` id (AdvBench, HarmBench, ...). ``None`` uses
            the organism corpus's harmful prompts.
        prompt_field: column with the prompt (default: chat ``messages``, else the first of prompt,
            instruction, goal, Behavior, ...; read by :func:`lit_safety.data.files.record_prompt`, so an
            Alpaca ``input`` follows its instruction after a blank line).
        target_field: column with the target: refusal text for ``objective=refusal`` (default
            ``DEFAULT_REFUSAL`` when the data has none), harmful target for ``compliance``
            (AdvBench ``target``).
        default_refusal: refusal used when the data has no refusal column.
        objective: ``refusal``, ``compliance`` or ``judge`` (linked from the model).
        num_samples: number of prompts (the first after a seeded shuffle; all if fewer).
        batch_size: prompts per forward/backward pass.
        max_length: tokens per prompt + target.
        split: `datasets` split when ``data_path`` is a hub id.
        seed: shuffling seed.

    Under DDP/FSDP2 every rank gets ``examples[rank::world_size]``, padded to the same length with
    copies of weight 0 (:func:`lit_safety.parallel.pad_shard_indices`), instead of Lightning's
    DistributedSampler, which pads with repeats that would count twice: S stays the mean over the
    unique prompts, whatever the number of ranks.
    """

    def __init__(
        self,
        tokenizer: str = "organism-dense-aligned",
        data_path: str | None = None,
        prompt_field: str | None = None,
        target_field: str | None = None,
        default_refusal: str = DEFAULT_REFUSAL,
        objective: str = "refusal",
        num_samples: int = 256,
        batch_size: int = 8,
        max_length: int = 256,
        split: str = "train",
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_counts(num_samples=num_samples, batch_size=batch_size, max_length=max_length)
        self.tokenizer_name = tokenizer
        self.data_path = data_path
        self.prompt_field = prompt_field
        self.target_field = target_field
        self.default_refusal = default_refusal
        self.objective = objective
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.max_length = max_length
        self.split = split
        self.seed = seed
        self.examples: list[dict[str, Any]] | None = None

    def load_prompts(self) -> tuple[list[str], list[str] | None]:
        """(prompts, targets or None); raises DataError for bad files/fields before model work."""
        kind = _target_kind(self.objective)
        if self.data_path is None:
            examples = builtin_corpus().harmful_examples(self.num_samples, seed=self.seed)
            prompts = [ex.prompt for ex in examples]
            targets = {"refusal": [ex.refusal for ex in examples], "compliance": [ex.response for ex in examples]}
            return prompts, targets.get(kind)
        rows = read_records(self.data_path, split=self.split)
        key = prompt_key(rows, self.prompt_field, self.data_path)
        all_prompts = record_prompts(rows, key, self.data_path)
        target_key = None
        if kind is not None:
            if self.target_field is not None or kind == "compliance":
                target_key = pick_field(rows, self.target_field, TARGET_FIELDS[kind], self.data_path, f"{kind} target")
        order = list(range(len(rows)))
        random.Random(self.seed).shuffle(order)
        order = [i for i in order if all_prompts[i]][: self.num_samples]
        if not order:
            raise DataError(f"{self.data_path}: prompt field {key!r} is empty in every row")
        prompts = [all_prompts[i] for i in order]
        if kind == "refusal" and target_key is None:
            return prompts, [self.default_refusal] * len(prompts)
        return prompts, ([str(rows[i][target_key]).strip() for i in order] if target_key else None)

    def setup(self, stage: str | None = None) -> None:
        if self.examples is not None:
            return
        prompts, targets = self.load_prompts()
        tokenizer = load_tokenizer(self.tokenizer_name)
        self.pad_id = tokenizer.pad_token_id
        self.examples = encode_examples(tokenizer, prompts, targets, self.objective, self.max_length)

    @property
    def num_examples(self) -> int:
        return len(self.examples or [])

    def shard(self, rank: int, world_size: int) -> list[dict[str, Any]]:
        """This rank's examples, each with a ``weight``: 1.0, or 0.0 for a padding copy."""
        examples = self.examples or []
        return [{**examples[i], "weight": 0.0 if padding else 1.0}
                for i, padding in pad_shard_indices(len(examples), rank, world_size)]

    def train_dataloader(self) -> DataLoader:
        collate = partial(collate_examples, pad_id=self.pad_id)
        trainer = self.trainer
        world = trainer.world_size if trainer is not None else 1
        if world <= 1:
            return DataLoader(self.examples, batch_size=self.batch_size, shuffle=False, collate_fn=collate)
        shard = self.shard(trainer.global_rank, world)
        return DataLoader(shard, batch_size=self.batch_size, sampler=PreShardedSampler(shard), collate_fn=collate)
