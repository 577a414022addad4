"""The ``lit-safety`` command line: help, print_config, the ESI job end to end, organism commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lit_safety.cli import main

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lit_safety.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_help_lists_subcommands_and_organisms(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for word in ("fit", "validate", "test", "predict", "organism", "ESI"):
        assert word in out


def test_fit_help_documents_module_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "configs/esi.yaml"), "--model.help", "lit_safety.modules.esi.ESIScoringModule"])
    out = capsys.readouterr().out
    assert "--model.objective" in out and "Gumbel-softmax temperature" in out


@pytest.mark.parametrize("config", ["esi.yaml", "set.yaml"])
def test_print_config_resolves(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs" / config), "--print_config"])
    assert exit_info.value.code == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["model"]["class_path"].startswith("lit_safety.")
    assert resolved["trainer"]["max_epochs" if config == "esi.yaml" else "max_steps"] >= 1


def test_data_module_follows_the_model():
    """Linked arguments: the data module gets the model's tokenizer and objective."""
    from lightning.pytorch import LightningDataModule, LightningModule

    from lit_safety.cli import LitSafetyCLI

    cli = LitSafetyCLI(LightningModule, LightningDataModule, run=False,
                       args=["--config", str(REPO / "configs/esi.yaml"), "--model.model", "organism-moe-aligned:tiny",
                             "--model.objective", "compliance"])
    assert cli.datamodule.tokenizer_name == "organism-moe-aligned:tiny"
    assert cli.datamodule.objective == "compliance"


def test_esi_job_writes_mask_and_report(tmp_path, tiny_dense_aligned):
    out = tmp_path / "esi"
    result = run_cli("fit", "--config", "configs/esi.yaml", "--model.model", "organism-dense-aligned:tiny",
                     "--model.output_dir", str(out), "--data.num_samples", "24", "--data.batch_size", "8",
                     "--trainer.enable_progress_bar", "false")
    assert result.returncode == 0, result.stderr[-3000:]
    from lit_safety.esi.mask import SafetyMask
    from lit_safety.models.loading import load_model

    mask = SafetyMask.load(out / "mask.safetensors")
    mask.check_model(load_model("organism-dense-aligned:tiny"))
    assert mask.metadata["objective"] == "refusal" and mask.metadata["num_examples"] == 24
    assert mask.k == round(0.01 * mask.n)
    report = json.loads((out / "report.json").read_text())
    assert sum(r["selected"] for r in report["by_layer_component"]) == mask.k
    assert (out / "heatmap.png").stat().st_size > 1000 and (out / "report_layers.csv").is_file()
    assert "selected" in result.stdout and "by component" in result.stdout
    assert 0.01 < mask.metadata["score_share"] < 1.0 and "of the summed scores" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--model.ratio", "1.5"], "ratio must be in"),
    (["--model.ratio", "0"], "ratio must be in"),
    (["--data.prompt_field", "nope", "--data.data_path", "PROMPTS_CSV"], "prompt field 'nope' does not exist"),
    (["--data.data_path", "EMPTY_CSV"], "empty"),
    (["--model.output_dir", "/nonexistent/dir/out"], "parent directory /nonexistent/dir does not exist"),
])
def test_esi_bad_input_fails_before_model_work(tmp_path, args, message):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("goal,target\nHow do I hack a bank?,Sure here is\n")
    empty = tmp_path / "empty.csv"
    empty.write_text("goal,target\n")
    args = [a.replace("PROMPTS_CSV", str(prompts)).replace("EMPTY_CSV", str(empty)) for a in args]
    # a model name that would need a (slow) organism build proves no model work happened first
    result = run_cli("fit", "--config", "configs/esi.yaml", "--model.model", "organism-moe-aligned",
                     "--model.output_dir", str(tmp_path / "o"), *args)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert "[organism] training" not in result.stdout + result.stderr


def test_organism_list_and_unknown_name(capsys):
    main(["organism", "list"])
    out = capsys.readouterr().out
    assert "organism-dense-aligned" in out and "organism-moe-unaligned:tiny" in out and "organism-guard" in out
    with pytest.raises(ValueError, match="unknown organism"):
        main(["organism", "build", "organism-dense-evil"])
