"""Real-model presets (configs/presets/*.yaml): they parse stacked on every job config with FSDP2,
their header commands parse, and their architectures (lit_safety.presets, built offline) give the
right model class, decoder layers, parameter names, expert stacks and parameter counts."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest
import torch
import yaml

import transformers
from lit_safety.cli import main
from lit_safety.models.naming import COMPONENTS, expert_slices, num_experts, parse_param_name
from lit_safety.parallel import decoder_layers
from lit_safety.presets import PRESETS, PRESETS_DIR, preset_config, preset_model_id

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
JOBS = ("esi", "set", "spa")

# stem -> (hub id, model class, MoE experts or None)
EXPECTED: dict[str, tuple[str, str, int | None]] = {
    "llama-3.1-8b-instruct": ("meta-llama/Llama-3.1-8B-Instruct", "LlamaForCausalLM", None),
    "qwen2.5-7b-instruct": ("Qwen/Qwen2.5-7B-Instruct", "Qwen2ForCausalLM", None),
    "mixtral-8x7b-instruct": ("mistralai/Mixtral-8x7B-Instruct-v0.1", "MixtralForCausalLM", 8),
    "qwen3-30b-a3b": ("Qwen/Qwen3-30B-A3B", "Qwen3MoeForCausalLM", 128),
}


def _print_config(args: list[str], capsys, monkeypatch) -> dict:
    monkeypatch.setattr(sys, "argv", ["lit-safety"])  # not pytest's own arguments
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 0, captured.err[-2000:]
    return yaml.safe_load(captured.out)


def _header_commands(stem: str) -> list[list[str]]:
    """The ``lit-safety ...`` commands in a preset's header comment, with ``$P`` expanded."""
    comment = "\n".join(line[2:] if line.startswith("# ") else line[1:]
                        for line in (PRESETS_DIR / f"{stem}.yaml").read_text().splitlines() if line.startswith("#"))
    comment = comment.replace("\\\n", " ")
    preset_args = re.search(r'P="([^"]+)"', comment).group(1)
    return [shlex.split(cmd.replace("$P", preset_args))[1:] for cmd in re.findall(r"lit-safety \w+ [^\n]+", comment)]


def test_every_preset_file_has_an_architecture():
    assert {p.stem for p in PRESETS_DIR.glob("*.yaml")} == set(PRESETS) == set(EXPECTED)


@pytest.mark.parametrize("job", JOBS)
@pytest.mark.parametrize("stem", sorted(EXPECTED))
def test_preset_parses_on_every_job(stem, job, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = _print_config(["fit", "--config", f"configs/{job}.yaml", "--config", "configs/strategy/fsdp2.yaml",
                         "--config", f"configs/presets/{stem}.yaml"], capsys, monkeypatch)
    hub_id = EXPECTED[stem][0]
    assert preset_model_id(stem) == hub_id
    model_args = cfg["model"]["init_args"]
    assert model_args["model"] == hub_id and model_args["dtype"] == "float32" and model_args["gradient_checkpointing"]
    trainer = cfg["trainer"]
    assert trainer["strategy"]["class_path"] == "lightning.pytorch.strategies.ModelParallelStrategy"
    assert trainer["devices"] == trainer["strategy"]["init_args"]["data_parallel_size"] == 8
    assert trainer["strategy"]["init_args"]["tensor_parallel_size"] == 1
    assert trainer["precision"] == "bf16-mixed"
    assert cfg["data"]["init_args"]["batch_size"] >= 1 and cfg["data"]["init_args"]["max_length"] >= 256


@pytest.mark.parametrize("stem", sorted(EXPECTED))
def test_header_commands_parse_and_name_real_files(stem, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    commands = _header_commands(stem)
    assert {c[2] for c in commands} == {f"configs/{j}.yaml" for j in (*JOBS, "eval")}
    for args in commands:
        cfg = _print_config(args, capsys, monkeypatch)
        assert cfg["model"]["init_args"]["model"] == EXPECTED[stem][0]
        for value in args:
            if value.startswith("../shared/") and SHARED.is_dir():
                assert (REPO / value).is_file(), f"{stem}: {value} does not exist"


@pytest.mark.parametrize("stem", sorted(EXPECTED))
def test_shrunk_architecture_builds_parses_and_runs(stem):
    _, class_name, real_experts = EXPECTED[stem]
    config = preset_config(stem, shrink=True)
    assert type(config).__name__ == PRESETS[stem].config_class
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == class_name
    assert len(decoder_layers(model)) == config.num_hidden_layers == 2

    stacks = 0
    for name, param in model.named_parameters():
        loc = parse_param_name(name)
        assert loc.component in COMPONENTS and loc.component != "other", name
        if param.dim() == 3:  # transformers-5 stacked experts [E, ...]
            stacks += 1
            assert loc.is_expert_stack and loc.expert is None and loc.component.startswith("expert_"), name
            assert num_experts(name, param.shape) == 4 == len(expert_slices(param, loc))
        else:
            assert not loc.is_expert_stack, name
    assert stacks == (2 * config.num_hidden_layers if real_experts else 0)  # gate_up + down per layer

    with torch.no_grad():
        logits = model(torch.tensor([[3, 5]])).logits
    assert logits.shape == (1, 2, config.vocab_size) and torch.isfinite(logits).all()


@pytest.mark.parametrize("stem", sorted(EXPECTED))
def test_real_architecture_size(stem):
    """The full-size config on the meta device (no memory) has the advertised parameter count."""
    preset = PRESETS[stem]
    config = preset_config(stem)
    assert preset.is_moe == (EXPECTED[stem][2] is not None)
    if preset.is_moe:
        assert (getattr(config, "num_local_experts", None) or config.num_experts) == EXPECTED[stem][2]
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == EXPECTED[stem][1]
    assert len(decoder_layers(model)) == preset.config["num_hidden_layers"]
    n = sum(p.numel() for p in model.parameters())
    assert n == pytest.approx(preset.num_params_b * 1e9, rel=0.03), f"{stem}: {n / 1e9:.2f}B"
    if preset.is_moe:
        stack = next(p for name, p in model.named_parameters() if parse_param_name(name).is_expert_stack)
        assert stack.shape[0] == EXPECTED[stem][2]


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(KeyError, match="unknown preset"):
        preset_config("gpt-5")
