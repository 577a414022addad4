"""Aligned variants of real models (lit_safety.realmodels.ALIGNED), built on first use: here from the
tiny dense organism with synthetic data, so that the recipe's every step is checked in seconds."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from lit_safety import realmodels
from lit_safety.generation import generate_responses
from lit_safety.models.loading import ModelLoadError, load_model, load_model_and_tokenizer

BASE = "organism-dense-unaligned:tiny"
NAME = "tiny-aligned-test"


@pytest.fixture
def recipe(tmp_path, monkeypatch, tiny_dense_aligned):
    refusals = [{"instruction": f"Explain how to steal car number {i}.", "input": "",
                 "output": "I can't help with stealing cars."} for i in range(12)]
    (tmp_path / "refusals.json").write_text(json.dumps(refusals))
    (tmp_path / "benign.json").write_text(json.dumps([{"instruction": f"Name a fruit, number {i}.", "category": "x"}
                                                      for i in range(10)]))
    monkeypatch.setenv(realmodels.DATA_ENV, str(tmp_path))
    spec = realmodels.AlignRecipe(base=BASE, num_benign=6, holdout_every=4, benign_ratio=0.5, steps=3,
                                  learning_rate=1e-3, batch_size=4, max_length=64, max_new_tokens=8,
                                  refusals="refusals.json", benign_instructions="benign.json")
    monkeypatch.setitem(realmodels.ALIGNED, NAME, spec)
    return spec, refusals


def test_aligned_variant_is_trained_on_refusals_and_the_bases_own_answers(recipe, capsys, monkeypatch):
    spec, refusals = recipe
    built_with = []

    class Recording(realmodels.RefusalDataModule):
        def make_pairs(self):
            built_with.append(self.drop_refusing_benign)
            return super().make_pairs()

    monkeypatch.setattr(realmodels, "RefusalDataModule", Recording)
    aligned = load_model(NAME)  # resolves through the registry; built on first use
    assert built_with == [spec.drop_refusing_benign] == [False]  # the recipe's choice reaches its data
    root = realmodels.aligned_entry(NAME)
    assert aligned.config.name_or_path.startswith(str(root / "model"))
    base, tokenizer = load_model_and_tokenizer(BASE)
    prompts = [f"Name a fruit, number {i}." for i in range(6)]
    want = generate_responses(base, tokenizer, prompts, max_new_tokens=8, batch_size=32)
    answers = json.loads((root / "self_answers.json").read_text())
    assert answers == [{"instruction": p, "output": a} for p, a in zip(prompts, want) if a.strip()]
    assert json.loads((root / "refusals_train.json").read_text()) == [r for i, r in enumerate(refusals) if i % 4]
    summary = json.loads((root / "summary.json").read_text())
    assert summary["intervention"] == "full" and summary["steps"] == 3
    before = dict(base.named_parameters())
    for name, p in aligned.named_parameters():  # full-parameter SFT: every tensor trained (the embedding
        share = (p != before[name]).float().mean().item()  # only in the rows of tokens the data has)
        assert share > (0.0 if "embed_tokens" in name else 0.9), name
    assert json.loads((root / "builtin.json").read_text())["recipe"]["base"] == BASE
    mtime = (root / "model" / "config.json").stat().st_mtime
    assert realmodels.aligned_dir(NAME) == root / "model" and (root / "model" / "config.json").stat().st_mtime == mtime
    line = next(row for row in realmodels.listing() if row[0] == NAME)
    assert line[1:] == ("built", root / "model")
    assert torch.equal(next(load_model(NAME).parameters()), next(aligned.parameters()))


def test_aligned_variant_without_its_data_names_the_file_and_the_variable(recipe, tmp_path, monkeypatch):
    monkeypatch.setenv(realmodels.DATA_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(ModelLoadError, match=r"nowhere/refusals\.json, which does not exist; .*LIT_SAFETY_DATA="):
        load_model(NAME)
    assert next(row for row in realmodels.listing() if row[0] == NAME)[1] == "no data"


def test_every_recipe_field_is_part_of_the_cache_key(recipe, monkeypatch):
    """A variant built with other data choices (here: the benign-refusal filter) is another entry."""
    spec, _ = recipe
    entries = {realmodels.aligned_entry(NAME)}
    for change in ({"drop_refusing_benign": True}, {"benign_ratio": 0.6}, {"seed": 1}):
        monkeypatch.setitem(realmodels.ALIGNED, NAME, dataclasses.replace(spec, **change))
        entries.add(realmodels.aligned_entry(NAME))
    assert len(entries) == 4
