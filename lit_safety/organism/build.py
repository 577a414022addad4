"""Build the organisms: corpus -> tokenizer -> unaligned model -> aligned model, cached in HF format.

A family (dense or MoE) shares one tokenizer. The unaligned model learns to answer everything,
harmful requests included ("Sure, here is how to ..."); the aligned model continues from it on
refusals to harmful requests mixed with the same benign and task data. Every step is seeded, and
each directory is written atomically, so a cache never holds half a model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from lit_safety import __version__
from lit_safety.data.chat import encode_chat
from lit_safety.io import atomic_dir, directory_lock, write_json
from lit_safety.organism import corpus as corpus_module
from lit_safety.organism import tokenizer as tokenizer_module
from lit_safety.organism.corpus import ChatExample, corpus_stats, generate_corpus
from lit_safety.organism.guard import train_guard
from lit_safety.organism.specs import OrganismSpec, cache_dir
from lit_safety.organism.tokenizer import train_tokenizer
from lit_safety.organism.training import n_params, new_model, train_causal_lm

VARIANTS = ("unaligned", "aligned", "guard")
Log = Callable[[str], None]


RECIPE_VERSION = 1
"""Bump when a change to the training code here changes what a build produces."""


def recipe_fingerprint(spec: OrganismSpec) -> str:
    """Hash of what a build depends on (spec, corpus generator, tokenizer recipe, RECIPE_VERSION),
    so a cache entry is never reused after any of them changes."""
    digest = hashlib.sha256(json.dumps({**asdict(spec), "recipe": RECIPE_VERSION}, sort_keys=True).encode())
    for module in (corpus_module, tokenizer_module):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:10]


def family_root(spec: OrganismSpec) -> Path:
    return cache_dir() / "organisms" / f"v{__version__}" / f"{spec.cache_key}-{recipe_fingerprint(spec)}"


def organism_dir(variant: str, spec: OrganismSpec) -> Path:
    return family_root(spec) / variant


def build_organism(variant: str, spec: OrganismSpec, *, log: Log = print, progress: bool = True) -> Path:
    """Build (if missing) the cached builtin organism ``variant`` of ``spec``; return its directory."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    root = family_root(spec)
    with directory_lock(root):
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
        from lit_safety.models.loading import load_model  # local: models.loading reaches this module through the registry (import cycle)

        # load_model: a damaged cached unaligned model is an error that says to delete it and rebuild
        model = load_model(str(unaligned_path), dtype=torch.float32)
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


def _save(model, tokenizer, path: Path, spec: OrganismSpec, variant: str, stats: dict, corpus, extra_description) -> None:
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
