"""LightningDataModules of (prompt, response) chat pairs, tokenized once with the chat template.

The tokenizer is named by the model it belongs to (the CLI links ``model.init_args.model`` to
``data.init_args.tokenizer``), so a data module never disagrees with its model about tokens.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import partial

import lightning as L
import torch
from torch.utils.data import DataLoader

from lit_safety.data.chat import collate_right_padded, encode_chat
from lit_safety.data.files import DataError, PROMPT_FIELDS, pick_field, read_records
from lit_safety.models.loading import load_tokenizer

Pair = tuple[str, str]
RESPONSE_FIELDS = ("output", "response", "answer", "completion")


class EpochSeededSampler(torch.utils.data.Sampler[int]):
    """A shuffle that depends only on (seed, epoch): Lightning calls ``set_epoch``, so a run
    resumed from a checkpoint sees exactly the batches an uninterrupted run would."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())

    def __len__(self) -> int:
        return self.n


class ChatPairsDataModule(L.LightningDataModule):
    """Base: subclasses return (prompt, response) pairs from ``load_pairs``; this class splits,
    tokenizes (loss on response tokens only) and batches them."""

    def __init__(
        self,
        tokenizer: str = "organism-dense-unaligned",
        batch_size: int = 16,
        max_length: int = 256,
        val_fraction: float = 0.05,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.tokenizer_name = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.val_fraction = val_fraction
        self.num_workers = num_workers
        self.seed = seed
        self.train_data: list[dict] | None = None
        self.val_data: list[dict] | None = None

    def load_pairs(self) -> list[Pair]:
        raise NotImplementedError

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
        self.val_data = [encode(*pairs[i]) for i in order[:n_val]]
        self.train_data = [encode(*pairs[i]) for i in order[n_val:]]

    def _loader(self, data: Sequence[dict], shuffle: bool) -> DataLoader:
        return DataLoader(
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
        prompt_field: field holding the request (default: first of instruction, prompt, goal, ...).
        response_field: field holding the refusal (default: ``output``).
        benign_path: file of benign instruction/answer pairs to mix in; ``None`` with
            ``benign_ratio > 0`` uses the organism corpus's benign answers.
        benign_ratio: share of benign pairs in the mix, in [0, 1).
        num_samples: number of harmful pairs to use (the first ones after a seeded shuffle).
    """

    def __init__(
        self,
        tokenizer: str = "organism-dense-unaligned",
        data_path: str | None = None,
        prompt_field: str | None = None,
        response_field: str | None = "output",
        benign_path: str | None = None,
        benign_ratio: float = 0.0,
        num_samples: int = 2000,
        batch_size: int = 16,
        max_length: int = 256,
        val_fraction: float = 0.05,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(tokenizer, batch_size, max_length, val_fraction, num_workers, seed)
        if not 0.0 <= benign_ratio < 1.0:
            raise ValueError(f"benign_ratio must be in [0, 1), got {benign_ratio}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.data_path = data_path
        self.prompt_field = prompt_field
        self.response_field = response_field
        self.benign_path = benign_path
        self.benign_ratio = benign_ratio
        self.num_samples = num_samples
        self._pairs: list[Pair] | None = None

    def load_pairs(self) -> list[Pair]:
        if self._pairs is None:
            harmful = self._harmful_pairs()
            n_benign = _count_for_share(len(harmful), self.benign_ratio)
            self._pairs = harmful + (self._benign_pairs(n_benign) if n_benign else [])
        return self._pairs

    def _harmful_pairs(self) -> list[Pair]:
        from lit_safety.organism.corpus import harmful_examples

        if self.data_path is None:
            return [(ex.prompt, ex.refusal) for ex in harmful_examples(self.num_samples, seed=self.seed)]
        return _file_pairs(read_records(self.data_path), self.data_path, self.prompt_field, self.response_field,
                           self.num_samples, self.seed)

    def _benign_pairs(self, n: int) -> list[Pair]:
        from lit_safety.organism.corpus import benign_examples

        if self.benign_path is None:
            return [(ex.prompt, ex.response) for ex in benign_examples(n, seed=self.seed)]
        return _file_pairs(read_records(self.benign_path), self.benign_path, None, None, n, self.seed)


def _count_for_share(n_base: int, share: float) -> int:
    """How many extra pairs to add to ``n_base`` so that they make up ``share`` of the mix."""
    return round(n_base * share / (1.0 - share))


def _file_pairs(rows: list[dict], path: str, prompt_field: str | None, response_field: str | None, limit: int,
                seed: int) -> list[Pair]:
    """(prompt, response) pairs from the rows of ``path``; an Alpaca ``input`` is appended to the
    instruction."""
    prompt_key = pick_field(rows, prompt_field, PROMPT_FIELDS, path, "prompt")
    response_key = pick_field(rows, response_field, RESPONSE_FIELDS, path, "response")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    pairs = []
    for i in order:
        prompt, response = str(rows[i][prompt_key] or "").strip(), str(rows[i][response_key] or "").strip()
        extra = str(rows[i].get("input") or "").strip()
        if prompt and response:
            pairs.append((f"{prompt}\n\n{extra}" if extra else prompt, response))
        if len(pairs) == limit:
            break
    if not pairs:
        raise DataError(f"{path}: no row has both a {prompt_key!r} and a {response_key!r}")
    return pairs


class InstructionDataModule(ChatPairsDataModule):
    """Task data for SPA (instruction tuning): GSM8K JSONL (question/answer), Alpaca JSON
    (instruction/input/output), or chat JSONL with a ``messages`` list; the organism's arithmetic
    word problems by default.

    Args:
        data_path: file or `datasets` id; ``None`` uses the organism corpus's task examples.
        prompt_field: request column (default: first of instruction, question, prompt, ...).
        response_field: answer column (default: first of output, answer, response, completion).
        num_samples: number of examples (the first after a seeded shuffle).
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
        super().__init__(tokenizer, batch_size, max_length, val_fraction, num_workers, seed)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if not 0.0 <= harmful_ratio < 1.0:
            raise ValueError(f"harmful_ratio must be in [0, 1), got {harmful_ratio}")
        if not isinstance(response_prefix, str):
            raise ValueError(f"response_prefix must be a string, got {type(response_prefix).__name__}")
        self.response_prefix = response_prefix
        self.data_path = data_path
        self.prompt_field = prompt_field
        self.response_field = response_field
        self.num_samples = num_samples
        self.harmful_ratio = harmful_ratio
        self._pairs: list[Pair] | None = None

    def load_pairs(self) -> list[Pair]:
        if self._pairs is None:
            task = [(prompt, self.response_prefix + response) for prompt, response in self._load()]
            n_harmful = _count_for_share(len(task), self.harmful_ratio)
            if n_harmful:
                from lit_safety.organism.corpus import harmful_examples

                task += [(ex.prompt, ex.response) for ex in harmful_examples(n_harmful, seed=self.seed + 1)]
            self._pairs = task
        return self._pairs

    def _load(self) -> list[Pair]:
        if self.data_path is None:
            from lit_safety.organism.corpus import task_examples

            return [(ex.prompt, ex.response) for ex in task_examples(self.num_samples, seed=self.seed)]
        rows = read_records(self.data_path)
        if "messages" in rows[0] and self.prompt_field is None:
            return _message_pairs(rows, self.data_path, self.num_samples, self.seed)
        prompt_fields = ("instruction", "question") + tuple(f for f in PROMPT_FIELDS if f not in ("instruction", "question"))
        prompt_key = pick_field(rows, self.prompt_field, prompt_fields, self.data_path, "prompt")
        return _file_pairs(rows, self.data_path, prompt_key, self.response_field, self.num_samples, self.seed)


def _message_pairs(rows: list[dict], path: str, limit: int, seed: int) -> list[Pair]:
    """(prompt, response) from chat records: the last assistant turn is the response, the turns
    before it (rendered by the chat template later) are flattened into the prompt."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    pairs = []
    for i in order:
        messages = rows[i]["messages"]
        if not isinstance(messages, list) or not messages or messages[-1].get("role") != "assistant":
            raise DataError(f"{path}: row {i}: 'messages' must be a list ending with an assistant turn")
        user = [m["content"] for m in messages[:-1] if m.get("role") == "user"]
        if user:
            pairs.append(("\n\n".join(user), messages[-1]["content"]))
        if len(pairs) == limit:
            break
    if not pairs:
        raise DataError(f"{path}: no usable chat record")
    return pairs
