"""LightningDataModules of (prompt, response) chat pairs, tokenized once with the chat template.

The tokenizer is named by the model it belongs to (the CLI links ``model.init_args.model`` to
``data.init_args.tokenizer``), so a data module never disagrees with its model about tokens.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from functools import partial

import lightning as L
import torch
from torch.utils.data import DataLoader

from lit_safety.data.chat import collate_right_padded, encode_chat, render_prompt, supervised_tokens
from lit_safety.data.files import (
    MESSAGES_FIELD,
    PROMPT_FIELDS,
    DataError,
    check_counts,
    pick_field,
    prompt_key,
    read_records,
    record_prompts,
    row_location,
)
from lit_safety.judges.keyword import KeywordJudge
from lit_safety.models.loading import load_tokenizer
from lit_safety.registry import builtin_corpus

log = logging.getLogger(__name__)

Pair = tuple[str, str]
RESPONSE_FIELDS = ("output", "response", "answer", "completion")
TASK_PROMPT_FIELDS = ("instruction", "question", *(f for f in PROMPT_FIELDS if f not in ("instruction", "question")))
"""Task data looks for an instruction or a question first (Alpaca, GSM8K)."""


class EpochSeededSampler(torch.utils.data.Sampler[int]):
    """A shuffle that depends only on (seed, epoch): Lightning calls ``set_epoch`` before every
    epoch, so any run (a resumed one too) draws epoch e's order from ``seed`` and e alone.

    The order is half of an exact resume; the other half, how far into the epoch a checkpoint was
    taken, is kept by :class:`ResumableDataLoader`, which Lightning saves and restores with the
    checkpoint. Together a run resumed mid-epoch sees exactly the batches an uninterrupted run
    would. Under DDP, Lightning wraps this sampler in a ``DistributedSamplerWrapper`` (and forwards
    ``set_epoch``), so every rank shards the same order.
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())

    def __len__(self) -> int:
        return self.n


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose position in the current epoch is stored in Lightning checkpoints.

    Lightning saves ``state_dict()`` of every training loader that has one (``"epoch"``: the
    sampler's epoch of the current pass; ``"batches"``: the batches it has handed out in that pass)
    and calls ``load_state_dict()`` when a run resumes. The next pass then leaves out the batches
    the checkpointed run had already trained on -- when it is the same epoch, and only that one
    pass: a state saved after an epoch's last batch, or in an earlier epoch, leaves nothing out.
    ``len()`` stays the whole epoch (Lightning counts the restored batches itself).

    The left-out batches are drawn and dropped (for in-memory data, milliseconds), so any sampler
    works, including the ``DistributedSamplerWrapper`` Lightning puts around the sampler under
    DDP. A pass starts at its first batch, not at ``iter()``: Lightning calls ``iter()`` before
    ``set_epoch``, and the sampler must be asked for its order after it.
    """

    _resume: tuple[int | None, int] | None = None  # (epoch, batches) loaded, for the next pass
    _pass_epoch: int | None = None
    _yielded = 0

    def _sampler_epoch(self) -> int | None:
        for sampler in (self.sampler, getattr(self.batch_sampler, "sampler", None)):
            if hasattr(sampler, "epoch"):
                return int(sampler.epoch)
        return None

    def state_dict(self) -> dict[str, int | None]:
        if self._resume is not None:  # restored, not iterated yet: still that position
            return {"epoch": self._resume[0], "batches": self._resume[1]}
        epoch = self._pass_epoch if self._pass_epoch is not None else self._sampler_epoch()
        return {"epoch": epoch, "batches": self._yielded}

    def load_state_dict(self, state_dict: dict[str, int | None]) -> None:
        missing = [key for key in ("epoch", "batches") if key not in state_dict]
        if missing:
            raise ValueError(f"training data loader state (checkpoint 'loops.fit_loop.state_dict.combined_loader'): "
                             f"{missing[0]!r} is missing; got {sorted(state_dict)}")
        batches = state_dict["batches"]
        if not isinstance(batches, int) or batches < 0:
            raise ValueError(f"training data loader state: batches must be an int >= 0, got {batches!r}")
        if batches > len(self):
            raise ValueError(f"training data loader state: the checkpointed run had trained on {batches} batches of "
                             f"its epoch, but an epoch here has {len(self)}: resume with the training data (data "
                             "file, num_samples, batch_size, val_fraction, seed) of the checkpointed run")
        epoch = state_dict["epoch"]
        self._resume = (None if epoch is None else int(epoch), batches)

    def __iter__(self):
        # A generator: nothing (sampler order, worker start-up) happens before the first batch.
        epoch, skip = self._sampler_epoch(), 0
        if self._resume is not None:
            saved_epoch, saved = self._resume
            self._resume = None
            if saved_epoch == epoch and saved < len(self):
                skip = saved
        self._pass_epoch, self._yielded = epoch, 0
        for batch in super().__iter__():
            self._yielded += 1
            if self._yielded > skip:
                yield batch


class ChatPairsDataModule(L.LightningDataModule):
    """Base: subclasses make (prompt, response) pairs in ``make_pairs`` (from ``data_path``, read by
    :func:`file_pairs`, or from the organism corpus); this class caches, splits, tokenizes (loss on
    response tokens only) and batches them."""

    def __init__(self, tokenizer: str, data_path: str | None, prompt_field: str | None, response_field: str | None,
                 num_samples: int, batch_size: int, max_length: int, val_fraction: float, num_workers: int,
                 seed: int) -> None:
        super().__init__()
        check_counts(num_samples=num_samples, batch_size=batch_size, max_length=max_length)
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.tokenizer_name = tokenizer
        self.data_path = data_path
        self.prompt_field = prompt_field
        self.response_field = response_field
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.max_length = max_length
        self.val_fraction = val_fraction
        self.num_workers = num_workers
        self.seed = seed
        self.train_data: list[dict] | None = None
        self.val_data: list[dict] | None = None
        self._pairs: list[Pair] | None = None

    def make_pairs(self) -> list[Pair]:
        raise NotImplementedError

    def load_pairs(self) -> list[Pair]:
        """The pairs (made once)."""
        if self._pairs is None:
            self._pairs = self.make_pairs()
        return self._pairs

    def prepare_data(self) -> None:
        # Validate inputs on rank 0 before any model work (clear error on bad files or fields).
        if not self.load_pairs():
            raise DataError(f"{type(self).__name__}: the data set is empty")

    def setup(self, stage: str | None = None) -> None:
        if self.train_data is not None:
            return
        pairs = self.load_pairs()
        if not pairs:
            raise DataError(f"{type(self).__name__}: the data set is empty")
        tokenizer = load_tokenizer(self.tokenizer_name)
        self.pad_id = tokenizer.pad_token_id
        order = list(range(len(pairs)))
        random.Random(self.seed).shuffle(order)
        n_val = int(len(pairs) * self.val_fraction)
        encode = partial(encode_chat, tokenizer, max_length=self.max_length)
        val_data = [encode(*pairs[i]) for i in order[:n_val]]
        train_data = [encode(*pairs[i]) for i in order[n_val:]]
        self.train_data = self._supervised(train_data, "training", tokenizer, [pairs[i] for i in order[n_val:]])
        self.val_data = self._supervised(val_data, "validation") if val_data else val_data

    def data_source(self) -> str:
        """The data the pairs come from, as error messages name it."""
        return self.data_path or "the organism corpus"

    def _supervised(self, examples: list[dict], part: str, tokenizer=None, pairs: Sequence[Pair] = ()) -> list[dict]:
        """``examples`` that keep a response token within max_length: the others are left out with a
        warning that counts them (they would train on nothing; a batch of only such examples has a NaN
        loss). None left of the training part: a DataError naming the data and max_length."""
        kept = [ex for ex in examples if supervised_tokens(ex)]
        if len(kept) == len(examples):
            return examples
        if not kept and part == "training":
            shortest = min(len(tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"])
                           for prompt, _ in pairs)
            raise DataError(f"{self.data_source()}: none of the {len(examples)} training examples has a response token "
                            f"within max_length={self.max_length}: the shortest prompt has {shortest} tokens (chat "
                            "template included) and truncation cuts the answer first; raise max_length")
        log.warning("%s: %d of %d %s examples have no response token within max_length=%d (their prompts fill it); "
                    "they are left out", self.data_source(), len(examples) - len(kept), len(examples), part,
                    self.max_length)
        return kept

    def _loader(self, data: Sequence[dict], shuffle: bool) -> DataLoader:
        return (ResumableDataLoader if shuffle else DataLoader)(
            data, batch_size=self.batch_size, num_workers=self.num_workers,
            sampler=EpochSeededSampler(len(data), self.seed) if shuffle else None,
            collate_fn=partial(collate_right_padded, pad_token_id=self.pad_id),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_data, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_data, shuffle=False) if self.val_data else []


class RefusalDataModule(ChatPairsDataModule):
    """Harmful prompt -> refusal pairs (SET's training data), optionally mixed with benign pairs.

    Args:
        data_path: JSON/JSONL/CSV file or `datasets` id of refusal pairs (e.g. circuit-breakers'
            instruction/input/output). ``None`` uses the organism corpus's own refusals.
        prompt_field: field holding the request (default: chat ``messages``, else the first of
            prompt, instruction, goal, ...; prompts are read by
            :func:`lit_safety.data.files.record_prompt`).
        response_field: field holding the refusal (default: ``output``).
        benign_path: file of benign instruction/answer pairs to mix in; ``None`` with
            ``benign_ratio > 0`` uses the organism corpus's benign answers.
        benign_ratio: share of benign pairs in the mix, in [0, 1).
        drop_refusing_benign: leave out benign pairs whose answer the refusal-keyword judge of the
            evaluation config (GCG's list plus common refusal openings) calls a refusal, with a
            warning that counts them: they would teach refusing harmless requests (a model's own
            answers to prompts that only sound harmful include a few). ``False`` keeps them, as
            recipes built before this filter did.
        num_samples: number of harmful pairs to use (the first ones after a seeded shuffle).
        max_length: tokens per example, prompt included (>= 1); the answer is cut first. Examples
            whose prompt fills it keep no answer token: they are left out with a warning that counts
            them, and data where all are is refused before training.
    """

    def __init__(
        self,
        tokenizer: str = "organism-dense-unaligned",
        data_path: str | None = None,
        prompt_field: str | None = None,
        response_field: str | None = "output",
        benign_path: str | None = None,
        benign_ratio: float = 0.0,
        drop_refusing_benign: bool = True,
        num_samples: int = 2000,
        batch_size: int = 16,
        max_length: int = 256,
        val_fraction: float = 0.05,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(tokenizer, data_path, prompt_field, response_field, num_samples, batch_size, max_length,
                         val_fraction, num_workers, seed)
        self.benign_path = benign_path
        self.benign_ratio = _share("benign_ratio", benign_ratio)
        if not isinstance(drop_refusing_benign, bool):
            raise ValueError(f"drop_refusing_benign must be true or false, got {drop_refusing_benign!r}")
        self.drop_refusing_benign = drop_refusing_benign

    def data_source(self) -> str:
        if not self.benign_ratio:
            return super().data_source()
        return f"{super().data_source()} (benign pairs: {self.benign_path or 'the organism corpus'})"

    def make_pairs(self) -> list[Pair]:
        harmful = self._harmful_pairs()
        n_benign = _count_for_share(len(harmful), self.benign_ratio)
        benign = self._benign_pairs(n_benign) if n_benign else []
        if len(benign) < n_benign:
            # Fewer benign pairs than the share needs: keep the share by using fewer harmful pairs.
            keep = max(1, round(len(benign) * (1.0 - self.benign_ratio) / self.benign_ratio))
            log.warning("benign_ratio %.2f: %s has %d benign pairs, not the %d that %d harmful pairs need; using %d "
                        "harmful pairs to keep the share", self.benign_ratio, self.benign_path or "the organism corpus",
                        len(benign), n_benign, len(harmful), keep)
            harmful = harmful[:keep]
        return harmful + benign

    def _harmful_pairs(self) -> list[Pair]:
        if self.data_path is None:
            return [(ex.prompt, ex.refusal) for ex in builtin_corpus().harmful_examples(self.num_samples, seed=self.seed)]
        return file_pairs(self.data_path, self.prompt_field, self.response_field, self.num_samples, self.seed)

    def _benign_pairs(self, n: int) -> list[Pair]:
        if self.benign_path is None:
            pairs = [(ex.prompt, ex.response) for ex in builtin_corpus().benign_examples(n, seed=self.seed)]
        else:
            pairs = file_pairs(self.benign_path, None, None, None, self.seed)
        if not self.drop_refusing_benign:
            return pairs[:n]
        judge = KeywordJudge(prefixes="extended")  # the refusal judge of configs/eval.yaml (over-refusal)
        answers = [pair for pair in pairs if not judge.is_refusal(pair[1])]
        if len(answers) < len(pairs):
            log.warning("%s: left out %d of %d benign pairs whose answer is a refusal (refusal keywords); "
                        "they would teach refusing harmless requests", self.benign_path or "the organism corpus",
                        len(pairs) - len(answers), len(pairs))
        if not answers:
            raise DataError(f"{self.benign_path}: every benign answer is a refusal (refusal keywords); benign "
                            "pairs must answer their request")
        return answers[:n]


def _share(name: str, value: float) -> float:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


def _count_for_share(n_base: int, share: float) -> int:
    """How many extra pairs to add to ``n_base`` so that they make up ``share`` of the mix."""
    return round(n_base * share / (1.0 - share))


def file_pairs(path: str, prompt_field: str | None, response_field: str | None, limit: int | None, seed: int,
               prompt_fields: Sequence[str] = PROMPT_FIELDS) -> list[Pair]:
    """Up to ``limit`` (``None``: all) (prompt, response) pairs from the records of ``path``, the first
    after a shuffle seeded by ``seed``, skipping records without both. Prompts are read by
    :func:`~lit_safety.data.files.record_prompt` (``prompt_field``, else chat ``messages``, else the
    first of ``prompt_fields``); the response is ``response_field`` (else the first of
    ``RESPONSE_FIELDS``), or a chat record's final assistant turn."""
    rows = read_records(path)
    key = prompt_key(rows, prompt_field, path, prompt_fields)
    prompts = record_prompts(rows, key, path)
    if key == MESSAGES_FIELD:
        response_key, responses = "final assistant turn", [_final_answer(row, path, row_location(rows, i))
                                                           for i, row in enumerate(rows)]
    else:
        response_key = pick_field(rows, response_field, RESPONSE_FIELDS, path, "response")
        responses = [str(row.get(response_key) or "").strip() for row in rows]
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    pairs = []
    for i in order:
        if prompts[i] and responses[i]:
            pairs.append((prompts[i], responses[i]))
        if len(pairs) == limit:
            break
    if not pairs:
        raise DataError(f"{path}: no row has both a {key!r} and a {response_key!r}")
    return pairs


def _final_answer(row: dict, path: str, where: str) -> str:
    """The last assistant turn of a chat record; ``where``: its place in ``path`` (``line N``)."""
    messages = row[MESSAGES_FIELD]
    if not messages or messages[-1].get("role") != "assistant":
        raise DataError(f"{path}: {where}: 'messages' must be a list ending with an assistant turn")
    return str(messages[-1].get("content") or "").strip()


class InstructionDataModule(ChatPairsDataModule):
    """Task data for SPA (instruction tuning): GSM8K JSONL (question/answer), Alpaca JSON
    (instruction/input/output), or chat JSONL with a ``messages`` list; the organism's arithmetic
    word problems by default.

    Args:
        data_path: file or `datasets` id; ``None`` uses the organism corpus's task examples.
        prompt_field: request column (default: chat ``messages``, else the first of instruction,
            question, prompt, ...; prompts are read by :func:`lit_safety.data.files.record_prompt`).
        response_field: answer column (default: first of output, answer, response, completion).
        num_samples: number of examples (the first after a seeded shuffle).
        max_length: tokens per example, prompt included (>= 1); the answer is cut first. Examples
            whose prompt fills it keep no answer token: they are left out with a warning that counts
            them, and data where all are is refused before training.
        harmful_ratio: share of harmful-prompt -> compliant-answer pairs mixed in (from the organism
            corpus), in [0, 1): the erosion pressure of harmful fine-tuning attack studies, so that
            SPA's protection can be measured. 0 = pure task data.
        response_prefix: text put before every task answer, e.g. ``"Sure, here is how to solve it. "``:
            benign data in an always-comply style, the milder erosion pressure of benign
            fine-tuning studies (the harmful pairs of ``harmful_ratio`` are left as they are).
    """

    def __init__(
        self,
        tokenizer: str = "organism-dense-aligned",
        data_path: str | None = None,
        prompt_field: str | None = None,
        response_field: str | None = None,
        num_samples: int = 4000,
        harmful_ratio: float = 0.0,
        response_prefix: str = "",
        batch_size: int = 16,
        max_length: int = 256,
        val_fraction: float = 0.05,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(tokenizer, data_path, prompt_field, response_field, num_samples, batch_size, max_length,
                         val_fraction, num_workers, seed)
        self.harmful_ratio = _share("harmful_ratio", harmful_ratio)
        if not isinstance(response_prefix, str):
            raise ValueError(f"response_prefix must be a string, got {type(response_prefix).__name__}")
        self.response_prefix = response_prefix

    def make_pairs(self) -> list[Pair]:
        task = [(prompt, self.response_prefix + response) for prompt, response in self._task_pairs()]
        n_harmful = _count_for_share(len(task), self.harmful_ratio)
        if n_harmful:
            task += [(ex.prompt, ex.response) for ex in builtin_corpus().harmful_examples(n_harmful, seed=self.seed + 1)]
        return task

    def _task_pairs(self) -> list[Pair]:
        if self.data_path is None:
            return [(ex.prompt, ex.response) for ex in builtin_corpus().task_examples(self.num_samples, seed=self.seed)]
        return file_pairs(self.data_path, self.prompt_field, self.response_field, self.num_samples, self.seed,
                          prompt_fields=TASK_PROMPT_FIELDS)
