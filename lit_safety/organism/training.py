"""The organisms' models and training loop: a new Llama / Mixtral of an :class:`OrganismSpec`, and
the one seeded AdamW loop that trains the language models (:func:`train_causal_lm`) and the guard
(:func:`lit_safety.organism.guard.train_verdicts`)."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lit_safety.data.chat import collate_right_padded
from lit_safety.organism.specs import OrganismSpec


def new_model(spec: OrganismSpec, tokenizer: Any):
    """A randomly initialised Llama (dense) or Mixtral (MoE) model sized by ``spec``."""
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=2 * spec.max_length,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if spec.arch == "dense":
        return LlamaForCausalLM(LlamaConfig(**common))
    if spec.arch == "moe":
        config = MixtralConfig(
            **common,
            num_local_experts=spec.num_experts,
            num_experts_per_tok=spec.experts_per_token,
            router_aux_loss_coef=spec.router_aux_loss_coef,
            output_router_logits=False,
            sliding_window=None,
        )
        return MixtralForCausalLM(config)
    raise ValueError(f"OrganismSpec.arch must be 'dense' or 'moe', got {spec.arch!r}")


def training_autocast(spec: OrganismSpec):
    """The autocast context of ``spec.precision`` (a no-op for float32, the default: bf16 autocast is
    ~12x slower than float32 on CPUs without bf16 units, and builds must match on every machine)."""
    dtype = spec.autocast_dtype
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def warmup_cosine_adamw(model: torch.nn.Module, lr: float, weight_decay: float, steps: int, *, floor: float):
    """AdamW with 5% linear warmup, then cosine decay to ``floor`` x ``lr`` (organism recipes)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_causal_lm(
    model: torch.nn.Module,
    data: Sequence[dict[str, list[int]]],
    spec: OrganismSpec,
    *,
    steps: int,
    seed: int,
    pad_id: int,
    lr: float | None = None,
    desc: str = "train",
    progress: bool = True,
) -> dict[str, Any]:
    """Plain AdamW with warmup + cosine decay; loss on response tokens only (labels from encode_chat)."""
    moe = spec.arch == "moe"

    def loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with training_autocast(spec):
            out = model(**batch, output_router_logits=True) if moe else model(**batch)
        return out.loss

    return train_steps(model, data, spec, loss, steps=steps, seed=seed, pad_id=pad_id, lr=lr, floor=0.1,
                       window=50, desc=desc, progress=progress)


def train_steps(
    model: torch.nn.Module,
    data: Sequence[dict[str, list[int]]],
    spec: OrganismSpec,
    loss_of: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    *,
    steps: int,
    seed: int,
    pad_id: int,
    lr: float | None,
    floor: float,
    window: int,
    desc: str,
    progress: bool,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """The organisms' training loop (language model and guard): AdamW with 5% warmup and cosine decay
    to ``floor`` x ``lr`` (``spec.lr`` by default), length-bucketed batches of ``spec.batch_size``
    drawn from a generator seeded by ``seed`` (re-bucketed every epoch), gradients clipped to norm 1.

    ``loss_of(batch)`` is the loss of one right-padded batch (it runs the forward pass, in
    :func:`training_autocast` where it wants it). Returns steps, seconds, the mean loss of the last
    ``window`` steps (also shown on the progress bar every ``window`` steps) and the learning rate;
    ``on_step(done)`` is called after every step.
    """
    from tqdm.auto import tqdm

    lr = spec.lr if lr is None else lr
    generator = torch.Generator().manual_seed(seed)
    optimizer, schedule = warmup_cosine_adamw(model, lr, spec.weight_decay, steps, floor=floor)
    model.train()
    batches = _length_bucketed_batches(data, spec.batch_size, generator)
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=desc, disable=not progress, mininterval=2.0)
    for step in bar:
        if step and step % len(batches) == 0:
            batches = _length_bucketed_batches(data, spec.batch_size, generator)
        loss = loss_of(collate_right_padded([data[i] for i in batches[step % len(batches)]], pad_id))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if len(losses) % window == 0:
            bar.set_postfix(loss=f"{sum(losses[-window:]) / window:.3f}")
        if on_step is not None:
            on_step(step + 1)
    model.eval()
    tail = losses[-window:] or [float("nan")]
    return {"steps": steps, "seconds": time.perf_counter() - start, "final_loss": sum(tail) / len(tail), "lr": lr}


def _length_bucketed_batches(data: Sequence[dict[str, list[int]]], batch_size: int,
                             generator: torch.Generator) -> list[list[int]]:
    """Shuffled batches of similar-length examples (less padding, same data every epoch)."""
    order = torch.randperm(len(data), generator=generator).tolist()
    pool = batch_size * 32
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: len(data[i]["input_ids"]))
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    batches = [b for b in batches if len(b) == batch_size] or batches
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
