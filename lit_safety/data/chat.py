"""Chat-template encoding shared by every data path: the template is applied once, and the loss
covers the assistant's response tokens only (prompt positions get label -100)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

IGNORE_INDEX = -100


def chat_messages(prompt: str, response: str | None = None, system: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def render_prompt(tokenizer: Any, prompt: str | list[dict[str, str]], system: str | None = None) -> str:
    """The text a model sees before it starts its answer (generation prompt included)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat_template; "
            "set tokenizer.chat_template (lit-safety works on chat models)"
        )
    messages = prompt if isinstance(prompt, list) else chat_messages(prompt, system=system)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_chat(
    tokenizer: Any,
    prompt: str | list[dict[str, str]],
    response: str,
    *,
    system: str | None = None,
    max_length: int | None = None,
) -> dict[str, list[int]]:
    """Token ids and labels for one (prompt, response) pair, loss on the response only.

    The prompt is rendered with the generation prompt and tokenized on its own, the rest of the
    full conversation text separately, so the boundary is exact for any tokenizer. Truncation cuts
    the response (never the prompt) so the label span always starts right after the prompt; a
    prompt of ``max_length`` tokens or more leaves no response token (every label -100, see
    :func:`supervised_tokens`) and keeps its last ``max_length`` tokens.
    """
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    messages = prompt if isinstance(prompt, list) else chat_messages(prompt, system=system)
    prompt_text = render_prompt(tokenizer, messages)
    full_text = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": response}], tokenize=False
    )
    if not full_text.startswith(prompt_text):
        raise ValueError("the chat template renders the prompt differently with and without the answer")
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    if max_length is not None:
        answer_ids = answer_ids[: max(0, max_length - len(prompt_ids))]
        prompt_ids = prompt_ids[-max_length:] if len(prompt_ids) > max_length else prompt_ids
    input_ids = prompt_ids + answer_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + list(answer_ids)
    return {"input_ids": input_ids, "labels": labels}


def supervised_tokens(feature: dict[str, list[int]]) -> int:
    """Label positions of an ``encode_chat`` output that the loss covers (label != -100)."""
    return sum(label != IGNORE_INDEX for label in feature["labels"])


def collate_left_padded(features: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch of token sequences on the left (scoring layout: every row ends at the last
    position, so the logits of each row's last tokens come from one slice, e.g. ``logits_to_keep``).
    ``labels`` are padded with -100 when the features have them."""
    width = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(features), width), dtype=torch.long)
    with_labels = all("labels" in f for f in features)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    for row, feature in enumerate(features):
        n = len(feature["input_ids"])
        input_ids[row, width - n:] = torch.tensor(feature["input_ids"], dtype=torch.long)
        attention_mask[row, width - n:] = 1
        if with_labels:
            labels[row, width - n:] = torch.tensor(feature["labels"], dtype=torch.long)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if with_labels:
        batch["labels"] = labels
    return batch


def collate_right_padded(features: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch of ``encode_chat`` outputs on the right (training layout)."""
    width = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(features), width), dtype=torch.long)
    for row, feature in enumerate(features):
        n = len(feature["input_ids"])
        input_ids[row, :n] = torch.tensor(feature["input_ids"])
        labels[row, :n] = torch.tensor(feature["labels"])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
