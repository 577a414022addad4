"""Batched chat generation with left padding (evaluation, organism checks, the judge objective).

Prompts longer than the model's context are truncated, not fed whole (a 100 KB prompt once asked a
192-token model for a 20 GB attention matrix). :func:`context_length` is the longest sequence the
model takes; :func:`generate_responses` leaves ``max_new_tokens`` of it for the answer and fits each
prompt into the rest with :func:`fit_prompt`, which shortens the *user message* and keeps its end:
the chat template around it (BOS, system prompt, user header, end of turn, the assistant header the
answer follows) stays whole, and so does the end of the request, where a question after a long
document or a many-shot jailbreak puts the actual ask. Each call that truncates warns, and can
report which prompts it cut (``truncated``); the evaluation counts them per set in its report
(``truncated_prompts``).
"""

from __future__ import annotations

import inspect
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import torch

from lit_safety.data.chat import render_prompt
from lit_safety.parallel import global_rank

T = TypeVar("T")


def progress_bar(total: int, desc: str, *, progress: bool = True, unit: str = "prompt") -> Any:
    """A tqdm bar (``tqdm.auto``) on stderr for a long pass, or a silent one when ``progress`` is
    false or this is not global rank 0. It stays on screen when it is the only bar, and is cleared
    when it runs below another one (Lightning's training bar)."""
    from tqdm.auto import tqdm

    stream = sys.stderr
    # Under a live Rich display (Lightning's RichProgressBar, during fit) stderr is Rich's FileProxy,
    # which prints every refresh as a line above the display: refresh rarely there.
    mininterval = 30.0 if type(stream).__module__.startswith("rich") else 0.1
    bar = tqdm(total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=True, mininterval=mininterval,
               disable=not progress or global_rank() != 0)
    bar.leave = abs(getattr(bar, "pos", 0)) == 0  # what tqdm's leave=None does, also for notebook bars
    return bar


def iter_batches(items: Sequence[T], batch_size: int, *, desc: str, progress: bool = True) -> Iterator[Sequence[T]]:
    """``items`` in slices of ``batch_size`` behind a :func:`progress_bar` that counts items; the bar
    advances once the caller is done with a slice."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    with progress_bar(len(items), desc, progress=progress) as bar:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            yield chunk
            bar.update(len(chunk))




CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
"""Model config fields that give the context length, the first one set wins."""
_UNSET_MODEL_MAX_LENGTH = 10**12
"""A tokenizer's ``model_max_length`` at or above this is transformers' "not set" sentinel (1e30)."""


def accepts_argument(module: Any, argument: str) -> bool:
    """Whether ``module.forward`` takes ``argument`` (e.g. ``position_ids``, ``logits_to_keep``)."""
    try:
        return argument in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def left_padded_forward(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int,
                        **kwargs: Any) -> Any:
    """``model``'s output on a left-padded batch, its logits computed at (at least) the last ``keep``
    positions.

    Each row gets the positions it would have unpadded (``position_ids``, as ``generate()`` uses
    under left padding), and a model that takes ``logits_to_keep`` computes its output layer only
    at the last ``keep``: over a large vocabulary the full logits of every position are most of the
    memory and time of a scoring pass. ``kwargs`` go to the forward (``use_cache=True`` to keep the
    batch's key/value cache). With a cache of earlier tokens in ``kwargs``, ``input_ids`` are the
    new tokens only and ``attention_mask`` covers the cached and the new ones, as in ``generate()``
    (:func:`lit_safety.evaluation.evaluator.answer_logprobs`)."""
    if accepts_argument(model, "position_ids"):
        positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        kwargs["position_ids"] = positions[:, -input_ids.shape[1]:]
    if accepts_argument(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = keep
    if getattr(getattr(model, "config", None), "output_router_logits", False):
        kwargs["output_router_logits"] = False  # router logits of padding tokens: not wanted here
    return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def tail_logits(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int,
                **kwargs: Any) -> torch.Tensor:
    """Logits of the last ``keep`` positions of a left-padded batch, ``[batch, keep, vocab]``
    (:func:`left_padded_forward`)."""
    return left_padded_forward(model, input_ids, attention_mask, keep, **kwargs).logits[:, -keep:]


def context_length(model: Any, tokenizer: Any = None) -> int | None:
    """The longest sequence (prompt and answer) ``model`` takes: the first of :data:`CONTEXT_FIELDS`
    in its (text) config, else ``tokenizer.model_max_length`` when that is set; None when neither
    says (then nothing is truncated). The model's own config wins over the tokenizer's figure."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in CONTEXT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < _UNSET_MODEL_MAX_LENGTH:
        return value
    return None


def prompt_budget(model: Any, tokenizer: Any, max_new_tokens: int) -> tuple[int | None, int | None]:
    """``(context, budget)``: :func:`context_length` and the tokens it leaves a prompt after
    ``max_new_tokens`` (both None when the context is unknown). A ``ValueError`` naming
    ``max_new_tokens`` when it leaves no room at all."""
    context = context_length(model, tokenizer)
    if context is None:
        return None, None
    if max_new_tokens >= context:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt: the model's context is "
                         f"{context} tokens; lower max_new_tokens")
    return context, context - max_new_tokens


def _count_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def fit_prompt(tokenizer: Any, prompt: str, *, max_tokens: int | None, system: str | None = None,
               context_note: str = "") -> tuple[str, bool]:
    """``(prompt, truncated)``: ``prompt`` itself when its chat-rendered text (:func:`render_prompt`)
    takes at most ``max_tokens`` tokens (or ``max_tokens`` is None), else the longest *end* of it
    whose rendered text does, its start cut on a token boundary. The template around the user
    message is never cut; a ``ValueError`` when the template (and ``system``) alone do not fit
    (``context_note`` says where ``max_tokens`` came from)."""
    if max_tokens is None or _count_tokens(tokenizer, render_prompt(tokenizer, prompt, system=system)) <= max_tokens:
        return prompt, False
    if isinstance(prompt, list):  # a whole chat: which message to cut is not ours to choose
        raise ValueError(f"a chat of {len(prompt)} messages does not fit in {max_tokens} tokens{context_note}")
    content = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    overhead = _count_tokens(tokenizer, render_prompt(tokenizer, "", system=system))
    keep = min(len(content), max_tokens - overhead)
    while keep > 0:  # token boundaries may merge differently once cut: shorten until it fits
        text = tokenizer.decode(content[len(content) - keep:], skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)
        excess = _count_tokens(tokenizer, render_prompt(tokenizer, text, system=system)) - max_tokens
        if excess <= 0:
            return text, True
        keep -= excess
    what = "the chat template and system prompt" if system else "the chat template"
    raise ValueError(f"{what} alone take {overhead} tokens, and a prompt may take {max_tokens}{context_note}: no "
                     "room is left for the request; shorten the system prompt or lower max_new_tokens")


@torch.no_grad()
def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 64,
    system_prompt: str | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    progress: bool = False,
    desc: str = "generate",
    synced_gpus: bool = False,
    truncated: list[int] | None = None,
) -> list[str]:
    """Greedy (default) or sampled answers to ``prompts``, in order, special tokens stripped.

    ``synced_gpus``: keep decoding until every rank is done (needed when the weights are sharded
    across ranks, as with FSDP, whose every forward is a collective). ``progress``: a
    :func:`progress_bar` named ``desc`` that counts prompts (global rank 0 only).

    A prompt longer than the model's context minus ``max_new_tokens`` (:func:`prompt_budget`) is cut
    to the end of its user message that fits (:func:`fit_prompt`), with a warning; ``truncated``,
    when given, is extended with the positions in ``prompts`` of the prompts that were cut. All
    prompts are fitted before the first one is generated, so a prompt that cannot fit fails early.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    context, budget = prompt_budget(model, tokenizer, max_new_tokens)
    note = f" (the model's context of {context} tokens less max_new_tokens={max_new_tokens})"
    fitted = [fit_prompt(tokenizer, p, max_tokens=budget, system=system_prompt, context_note=note) for p in prompts]
    cut = [i for i, (_, was_cut) in enumerate(fitted) if was_cut]
    if cut:
        warnings.warn(f"{len(cut)} of {len(prompts)} prompts are longer than the model's context allows ({context} "
                      f"tokens, {max_new_tokens} of them for the answer): their user message was cut to its last "
                      f"tokens to fit {budget}, the chat template around it kept", stacklevel=2)
        if truncated is not None:
            truncated.extend(cut)
    texts = [render_prompt(tokenizer, p, system=system_prompt) for p, _ in fitted]
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    extra: dict[str, Any] = {}
    if getattr(model.config, "output_router_logits", False):
        # Batched padded generate() breaks on MoE models while router logits are requested
        # (transformers #30731 / #29087).
        extra["output_router_logits"] = False
    if synced_gpus:
        extra["synced_gpus"] = True
    if do_sample:
        extra.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        extra.update(do_sample=False)
    responses: list[str] = []
    try:
        for chunk in iter_batches(texts, batch_size, desc=desc, progress=progress):
            batch = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **extra,
            )
            new_tokens = out[:, batch["input_ids"].shape[1] :]
            responses.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return [r.strip() for r in responses]
