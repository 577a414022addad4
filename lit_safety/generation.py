"""Batched chat generation with left padding (evaluation, organism checks, the judge objective)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lit_safety.data.chat import render_prompt


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
    across ranks, as with FSDP, whose every forward is a collective).
    """
    from tqdm.auto import tqdm

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
        for start in tqdm(range(0, len(texts), batch_size), desc=desc, disable=not progress, leave=False):
            batch = tokenizer(
                texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(device)
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
