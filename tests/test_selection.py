"""The one selection pipeline: SelectionConfig, and the same mask by every road that leads to it."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from lit_safety.cli import main
from lit_safety.data.datamodules import RefusalDataModule
from lit_safety.data.esi import HarmfulPromptsDataModule
from lit_safety.esi.api import compute_safety_mask
from lit_safety.esi.mask import SafetyMask
from lit_safety.esi.selection import SelectionConfig
from lit_safety.io import as_config, config_dict
from lit_safety.models.loading import load_model_and_tokenizer
from lit_safety.modules.intervention import SafetyInterventionModule

REPO = Path(__file__).resolve().parents[1]
MODEL = "organism-dense-unaligned:tiny"
N_PROMPTS = 20


def assert_identical(a: SafetyMask, b: SafetyMask) -> None:
    assert a.shapes == b.shapes and sorted(a.indices) == sorted(b.indices)
    for name in a.indices:
        assert torch.equal(a.indices[name], b.indices[name]), name
        assert torch.equal(a.scores[name], b.scores[name]), name
    assert (a.k, a.n, a.metadata["threshold"]) == (b.k, b.n, b.metadata["threshold"])


@pytest.mark.parametrize("method", ["esi", "random"])
def test_function_cli_and_fit_start_give_the_identical_mask(tmp_path, tiny_dense_aligned, method):
    """compute_safety_mask, ESIScoringModule under ``lit-safety fit`` and SafetyInterventionModule
    at fit start: same model, prompts, batches and selection -> bit-identical masks (indices,
    scores, threshold)."""
    selection = SelectionConfig(method=method, ratio=0.02, seed=5)
    data = HarmfulPromptsDataModule(tokenizer=MODEL, num_samples=N_PROMPTS, seed=selection.seed)
    prompts, targets = data.load_prompts()
    model, tokenizer = load_model_and_tokenizer(MODEL)
    by_function = compute_safety_mask(model, tokenizer, prompts, targets=targets, selection=selection,
                                      batch_size=data.batch_size, max_length=data.max_length, progress=False)

    main(["fit", "--config", str(REPO / "configs/esi.yaml"), "--model.model", MODEL,
          "--model.selection.method", method, "--model.selection.ratio", "0.02", "--model.selection.seed", "5",
          "--model.output_dir", str(tmp_path / "esi"), "--model.report", "false", "--data.num_samples", str(N_PROMPTS),
          "--data.batch_size", str(data.batch_size), "--data.max_length", str(data.max_length), "--data.seed", "5",
          "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)])
    by_cli = SafetyMask.load(tmp_path / "esi" / "mask.safetensors")

    module = SafetyInterventionModule(model=MODEL, selection=selection, esi_num_samples=N_PROMPTS,
                                      output_dir=str(tmp_path / "set"), save_model=False)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=RefusalDataModule(tokenizer=MODEL, num_samples=16, batch_size=8))
    at_fit_start = SafetyMask.load(tmp_path / "set" / "mask.safetensors")

    assert by_function.k == round(0.02 * by_function.n)
    assert_identical(by_function, by_cli)
    assert_identical(by_function, at_fit_start)
    assert by_cli.metadata["num_examples"] == at_fit_start.metadata["num_examples"] == (
        N_PROMPTS if method == "esi" else 0)


@pytest.mark.parametrize("fields, message", [
    ({"method": "top"}, "selection.method must be one of"),
    ({"ratio": 0.0}, r"selection.ratio must be in \(0, 1\]"),
    ({"ratio": None}, "give ratio"),
    ({"k": 0}, "selection.k must be >= 1"),
    ({"scope": "per_layer"}, "selection.scope must be one of"),
    ({"objective": "judge"}, "needs a guard model.*in a config: selection.guard_model"),
    ({"guard_model": "organism-guard"}, "guard_model is used by objective=judge only"),
    ({"include": ["("]}, "bad regex"),
])
def test_bad_selection_is_refused_when_configured(fields, message):
    with pytest.raises(ValueError, match=message):
        SelectionConfig(**fields)


def test_selection_config_round_trips_and_k_overrides_ratio():
    config = SelectionConfig(method="snip", k=7, include=["v_proj"], seed=3)
    assert config.top_k == (None, 7) and SelectionConfig().top_k == (0.01, None)
    assert as_config(SelectionConfig, config_dict(config), "selection") == config
    assert as_config(SelectionConfig, None, "selection") == SelectionConfig()
    with pytest.raises(TypeError, match="selection must be a SelectionConfig or a dict of its fields, got str"):
        as_config(SelectionConfig, "esi", "selection")
    assert SelectionConfig(method="random", objective="judge").make_objective() is None  # no guard needed, none loaded
    assert SelectionConfig(objective="compliance").make_objective().name == "compliance"


def test_intervention_selects_with_the_judge_objective(tmp_path, tiny_dense_aligned):
    """The judge objective (and so every SelectionConfig option) reaches SafetyInterventionModule:
    its fit-start mask equals compute_safety_mask's with the same guard and prompts."""
    selection = SelectionConfig(objective="judge", guard_model="organism-guard:tiny", ratio=0.02, seed=1)
    module = SafetyInterventionModule(model=MODEL, selection=selection, esi_num_samples=4,
                                      output_dir=str(tmp_path / "set"), save_model=False)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=RefusalDataModule(tokenizer=MODEL, num_samples=8, batch_size=8))
    prompts, targets = HarmfulPromptsDataModule(tokenizer=MODEL, objective="judge", num_samples=4, seed=1).load_prompts()
    assert targets is None  # the judge objective scores the model's own answers
    model, tokenizer = load_model_and_tokenizer(MODEL)
    expected = compute_safety_mask(model, tokenizer, prompts, selection=selection, progress=False)
    assert module.mask.metadata["objective"] == "judge" and module.mask.metadata["num_examples"] == 4
    assert_identical(module.mask, expected)
