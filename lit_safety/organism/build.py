"""Build the organisms: corpus -> tokenizer -> unaligned model -> aligned model, cached in HF format.

A family (dense or MoE) shares one tokenizer. The unaligned model learns to answer everything,
harmful requests included ("Sure, here is how to ..."); the aligned model continues from it on
refusals to harmful requests mixed with the same benign and task data. Every step is seeded, and
each directory is written atomically, so a cache never holds half a model.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from lit_safety import __version__
from lit_safety.data.chat import collate_right_padded, encode_chat
from lit_safety.io import atomic_dir, write_json
from lit_safety.organism import cache_dir
from lit_safety.organism.corpus import ChatExample, generate_corpus
from lit_safety.organism.specs import OrganismSpec

VARIANTS = ("unaligned", "aligned", "guard")
Log = Callable[[str], None]


RECIPE_VERSION = 1
"""Bump when a change to the training code here changes what a build produces."""


def recipe_fingerprint(spec: OrganismSpec) -> str:
    """Hash of what a build depends on (spec, corpus generator, tokenizer recipe, RECIPE_VERSION),
    so a cache entry is never reused after any of them changes."""
    import hashlib

    from lit_safety.organism import corpus, tokenizer

    digest = hashlib.sha256(json.dumps({**asdict(spec), "recipe": RECIPE_VERSION}, sort_keys=True).encode())
    for module in (corpus, tokenizer):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:10]


def family_root(spec: OrganismSpec) -> Path:
    return cache_dir() / "organisms" / f"v{__version__}" / f"{spec.cache_key}-{recipe_fingerprint(spec)}"


def organism_dir(variant: str, spec: OrganismSpec) -> Path:
    return family_root(spec) / variant


@contextlib.contextmanager
def _family_lock(root: Path) -> Iterator[None]:
    """One builder per family at a time (e.g. several DDP ranks asking for the same organism)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_organism(variant: str, spec: OrganismSpec, *, log: Log = print, progress: bool = True) -> Path:
    """Build (if missing) the cached builtin organism ``variant`` of ``spec``; return its directory."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    root = family_root(spec)
    with _family_lock(root):
        paths = build_family(spec, root, variants=(variant,), log=log, progress=progress)
    return paths[variant]


def build_family(
    spec: OrganismSpec,
    root: str | Path,
    *,
    variants: Sequence[str] = VARIANTS,
    extra_examples: Sequence[ChatExample] = (),
    extra_description: str | None = None,
    log: Log = print,
    progress: bool = True,
) -> dict[str, Path]:
    """Build the requested variants (and what they depend on) under ``root``; skip finished ones.

    ``extra_examples`` (e.g. loaded from real benchmark files by
    :mod:`lit_safety.organism.realdata`) are added to the generated corpus and to the tokenizer's
    training text.
    """
    root = Path(root)
    wanted = ["unaligned", "aligned"] if "aligned" in variants else ["unaligned"] if "unaligned" in variants else []
    wanted += ["guard"] if "guard" in variants else []
    paths = {v: root / v for v in wanted}
    if all((p / "config.json").is_file() for p in paths.values()):
        return paths

    corpus = generate_corpus(
        seed=spec.seed, split="train", n_harmful=spec.n_harmful, n_benign=spec.n_benign, n_task=spec.n_task
    )
    corpus = list(corpus) + list(extra_examples)
    tokenizer = _load_or_train_tokenizer(spec, root / "tokenizer", corpus, log)

    if "guard" in paths and not (paths["guard"] / "config.json").is_file():
        from lit_safety.organism.guard import train_guard

        log(f"[organism] training the {spec.arch} guard (safe/unsafe verdicts on prompt + answer)")
        train_guard(spec, tokenizer, paths["guard"], log=log, progress=progress)
    unaligned_path = root / "unaligned"
    if "unaligned" in paths and not (unaligned_path / "config.json").is_file():
        torch.manual_seed(spec.seed)
        model = new_model(spec, tokenizer)
        data = [encode_chat(tokenizer, ex.prompt, ex.response, max_length=spec.max_length) for ex in corpus]
        log(f"[organism] training {spec.arch} unaligned: {n_params(model):,} params, {len(data):,} examples, {spec.base_steps} steps")
        stats = train_causal_lm(model, data, spec, steps=spec.base_steps, seed=spec.seed, pad_id=tokenizer.pad_token_id,
                                desc=f"{spec.arch}-unaligned", progress=progress)
        _save(model, tokenizer, unaligned_path, spec, "unaligned", stats, corpus, extra_description)
        log(f"[organism] saved {unaligned_path} ({stats['seconds']:.0f} s, final loss {stats['final_loss']:.3f})")

    if "aligned" in paths and not (paths["aligned"] / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(unaligned_path, dtype=torch.float32)
        data = [
            encode_chat(tokenizer, ex.prompt, ex.refusal if ex.kind == "harmful" else ex.response, max_length=spec.max_length)
            for ex in corpus
        ]
        log(f"[organism] aligning {spec.arch}: {spec.align_steps} steps on refusals + benign answers")
        stats = train_causal_lm(model, data, spec, steps=spec.align_steps, seed=spec.seed + 1,
                                pad_id=tokenizer.pad_token_id, desc=f"{spec.arch}-aligned", progress=progress,
                                lr=spec.lr / 2)
        _save(model, tokenizer, paths["aligned"], spec, "aligned", stats, corpus, extra_description)
        log(f"[organism] saved {paths['aligned']} ({stats['seconds']:.0f} s, final loss {stats['final_loss']:.3f})")
    return paths


def _load_or_train_tokenizer(spec: OrganismSpec, path: Path, corpus: Sequence[ChatExample], log: Log):
    from transformers import AutoTokenizer

    from lit_safety.organism.tokenizer import train_tokenizer

    if (path / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(path)
    texts = []
    for ex in corpus:
        texts.extend(t for t in (ex.prompt, ex.response, ex.refusal) if t)
    log(f"[organism] training a {spec.vocab_size}-token BPE tokenizer on {len(texts):,} texts")
    tokenizer = train_tokenizer(texts, vocab_size=spec.vocab_size)
    with atomic_dir(path) as tmp:
        tokenizer.save_pretrained(tmp)
    return tokenizer


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
    from tqdm.auto import tqdm

    lr = spec.lr if lr is None else lr
    generator = torch.Generator().manual_seed(seed)
    optimizer, schedule = warmup_cosine_adamw(model, lr, spec.weight_decay, steps, floor=0.1)
    moe = spec.arch == "moe"
    model.train()
    batches = _length_bucketed_batches(data, spec.batch_size, generator)
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=desc, disable=not progress, mininterval=2.0)
    for step in bar:
        if step and step % len(batches) == 0:
            batches = _length_bucketed_batches(data, spec.batch_size, generator)
        batch = collate_right_padded([data[i] for i in batches[step % len(batches)]], pad_id)
        with training_autocast(spec):
            out = model(**batch, output_router_logits=True) if moe else model(**batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        if len(losses) % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / 50:.3f}")
    model.eval()
    tail = losses[-50:] or [float("nan")]
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


def _save(model, tokenizer, path: Path, spec: OrganismSpec, variant: str, stats: dict, corpus, extra_description) -> None:
    from lit_safety.organism.corpus import corpus_stats

    model.config.output_router_logits = False
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    info = {
        "variant": variant,
        "library_version": __version__,
        "spec": asdict(spec),
        "parameters": n_params(model),
        "training": stats,
        "corpus": corpus_stats(corpus),
        "extra_data": extra_description,
    }
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "organism.json", info)


def read_build_info(path: str | Path) -> dict[str, Any]:
    """The ``organism.json`` written next to a built organism."""
    return json.loads((Path(path) / "organism.json").read_text())
