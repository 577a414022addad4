"""Batched chat generation with left padding (evaluation, organism checks, the judge objective)."""

from __future__ import annotations

import sys
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
) -> list[str]:
    """Greedy (default) or sampled answers to ``prompts``, in order, special tokens stripped.

    ``synced_gpus``: keep decoding until every rank is done (needed when the weights are sharded
    across ranks, as with FSDP, whose every forward is a collective). ``progress``: a
    :func:`progress_bar` named ``desc`` that counts prompts (global rank 0 only).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    texts = [render_prompt(tokenizer, p, system=system_prompt) for p in prompts]
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
