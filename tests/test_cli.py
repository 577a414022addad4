"""The ``lit-safety`` command line: help, print_config, the evaluation suite options, the ESI job end to end,
organism commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from lightning import LightningDataModule, LightningModule

from lit_safety.cli import LitSafetyCLI, main

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
    assert "--model.selection.objective" in out and "Gumbel-softmax temperature of the judge objective" in out


@pytest.mark.parametrize("config", ["set.yaml", "spa.yaml", "esi.yaml"])
def test_config_help_shows_the_selection_group_with_its_docs(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs" / config), "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--trainer.max_steps" in out  # LightningCLI's own help first
    group = out[out.index("--model.selection.method METHOD\n"):]
    for option, doc in (("method", "Expected Safety Impact"), ("ratio", "Fraction of the scored weights"),
                        ("include", "Regexes of parameter names to score"), ("objective", "The safety objective S"),
                        ("seed", "Seed of the ``random`` baseline")):
        assert f"--model.selection.{option} " in group and doc in group, option


@pytest.mark.parametrize("config_lines, args, message", [
    ({"method": "random"}, [], "model.init_args.method (in CONFIG) is now model.init_args.intervention"),
    ({"selection": "esi"}, [], "model.init_args.selection: esi (in CONFIG) is now a group of options: "
                               "model.init_args.selection.method: esi"),
    ({"ratio": 0.02}, [], "model.init_args.ratio (in CONFIG) is now model.init_args.selection.ratio"),
    ({}, ["--model.objective", "compliance"], "--model.objective is now --model.selection.objective"),
])
def test_old_keys_name_the_new_key(tmp_path, config_lines, args, message):
    config = tmp_path / "old.yaml"
    config.write_text(yaml.safe_dump({"model": {"class_path": "lit_safety.modules.intervention.SafetyInterventionModule",
                                                "init_args": {"model": "organism-dense-unaligned", **config_lines}}}))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), *args])
    assert message.replace("CONFIG", str(config)) in str(exit_info.value.code)


@pytest.mark.parametrize("config", ["esi.yaml", "set.yaml"])
def test_print_config_resolves(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs" / config), "--print_config"])
    assert exit_info.value.code == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["model"]["class_path"].startswith("lit_safety.")
    assert resolved["trainer"]["max_epochs" if config == "esi.yaml" else "max_steps"] >= 1


@pytest.mark.parametrize("subcommand, job, stacked", [
    ("fit", "esi.yaml", "esi.yaml"), ("fit", "set.yaml", "set.yaml"), ("fit", "spa.yaml", "spa.yaml"),
    ("test", "eval.yaml", "eval.yaml"), ("test", "eval.yaml", "self_answers.yaml")])
def test_smollm2_configs_stack_on_their_job(subcommand, job, stacked, capsys):
    """configs/models/smollm2/<job>.yaml stacks after configs/<job>.yaml: every key it sets is one that
    job's classes accept, and the model is the real SmolLM2 (no model is loaded to print the config)."""
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, "--config", str(REPO / "configs" / job), "--config",
              str(REPO / "configs" / "models" / "smollm2" / stacked), "--print_config"])
    assert exit_info.value.code == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    model = resolved["model"]["init_args"]["model"]
    assert model == ("smollm2-135m-instruct-aligned" if stacked == "spa.yaml" else "smollm2-135m-instruct")
    data = resolved["data"]["init_args"]
    shared = json.dumps(data) + json.dumps(resolved["trainer"].get("callbacks"))
    assert "organism" not in shared  # every prompt set is real data, none the organisms' corpus
    if stacked == "set.yaml":
        assert data["benign_path"] == "outputs/smollm2-self-answers/samples.jsonl"


def test_eval_config_groups_the_suite_options(capsys):
    """The evaluation suite's options are one typed SuiteConfig: nested, documented, same defaults."""
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--config", str(REPO / "configs/eval.yaml"), "--data.suite.num_benign", "7", "--print_config"])
    assert exit_info.value.code == 0
    suite = yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]["suite"]
    assert suite["num_benign"] == 7 and suite["num_harmful"] == 200 and suite["harmful_data"] == "organism"
    assert suite["mc_data"] is None and suite["split"] == "train"

    with pytest.raises(SystemExit):
        main(["test", "--config", str(REPO / "configs/eval.yaml"), "--data.help", "lit_safety.data.eval.SafetyEvalDataModule"])
    out = capsys.readouterr().out
    assert "--data.suite.num_harmful" in out and "At most this many harmful prompts (null: all)" in out
    assert "--data.suite.jailbreak_templates" in out and "--data.batch_size" in out

    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "configs/set.yaml"), "--trainer.callbacks.help",
              "lit_safety.callbacks.SafetyEvalCallback", "--trainer.callbacks.data.help"])
    out = capsys.readouterr().out
    assert "--trainer.callbacks.data.num_harmful" in out and "Harmless instructions for the over-refusal rate" in out


def test_data_module_follows_the_model():
    """Linked arguments: the data module gets the model's tokenizer and objective."""
    from lightning.pytorch import LightningDataModule, LightningModule

    from lit_safety.cli import LitSafetyCLI

    cli = LitSafetyCLI(LightningModule, LightningDataModule, run=False,
                       args=["--config", str(REPO / "configs/esi.yaml"), "--model.model", "organism-moe-aligned:tiny",
                             "--model.selection.objective", "compliance"])
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


ESI_BAD_INPUT = [
    (["--model.selection.ratio", "1.5"], "selection.ratio must be in"),
    (["--model.selection.ratio", "0"], "selection.ratio must be in"),
    (["--data.prompt_field", "nope", "--data.data_path", "PROMPTS_CSV"], "prompt field 'nope' does not exist"),
    (["--data.data_path", "EMPTY_CSV"], "empty"),
    (["--model.output_dir", "/nonexistent/dir/out"], "parent directory /nonexistent/dir does not exist"),
]


@pytest.fixture(scope="module")
def esi_bad_input_runs(tmp_path_factory) -> list[subprocess.CompletedProcess]:
    """The ``lit-safety fit`` runs of ESI_BAD_INPUT, started side by side: each is a fresh interpreter
    that spends most of its time on imports (13 s of each on a 2-core machine without AVX-512, one
    after the other)."""
    tmp = tmp_path_factory.mktemp("esi_bad_input")
    prompts = tmp / "prompts.csv"
    prompts.write_text("goal,target\nHow do I hack a bank?,Sure here is\n")
    empty = tmp / "empty.csv"
    empty.write_text("goal,target\n")
    started = []
    for i, (args, _) in enumerate(ESI_BAD_INPUT):
        args = [a.replace("PROMPTS_CSV", str(prompts)).replace("EMPTY_CSV", str(empty)) for a in args]
        # a model name that would need a (slow) organism build proves no model work happened first
        argv = [sys.executable, "-m", "lit_safety.cli", "fit", "--config", "configs/esi.yaml", "--model.model",
                "organism-moe-aligned", "--model.output_dir", str(tmp / f"o{i}"), *args]
        out, err = open(tmp / f"{i}.out", "w+"), open(tmp / f"{i}.err", "w+")  # files: a full pipe cannot block
        started.append((argv, subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=err, text=True), out, err))
    done = []
    for argv, process, out, err in started:
        returncode = process.wait(timeout=600)
        with out, err:
            out.seek(0)
            err.seek(0)
            done.append(subprocess.CompletedProcess(argv, returncode, out.read(), err.read()))
    return done


@pytest.mark.parametrize("case", range(len(ESI_BAD_INPUT)),
                         ids=[f"{i}{args[0]}" for i, (args, _) in enumerate(ESI_BAD_INPUT)])
def test_esi_bad_input_fails_before_model_work(esi_bad_input_runs, case):
    args, message = ESI_BAD_INPUT[case]
    result = esi_bad_input_runs[case]
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert "[organism] training" not in result.stdout + result.stderr
    if args[0] in ("--model.selection.ratio", "--model.output_dir"):  # the one line that matters, no traceback
        assert "Traceback" not in result.stderr and result.stderr.strip().splitlines()[-1].startswith(
            "lit-safety fit: error: --model (ESIScoringModule): "), result.stderr[-2000:]


def test_organism_list_and_unknown_name(capsys):
    main(["organism", "list"])
    out = capsys.readouterr().out
    assert "organism-dense-aligned" in out and "organism-moe-unaligned:tiny" in out and "organism-guard" in out
    with pytest.raises(ValueError, match="unknown organism"):
        main(["organism", "build", "organism-dense-evil"])


def test_old_eval_data_keys_name_the_suite_group(tmp_path):
    config = tmp_path / "old_eval.yaml"
    config.write_text(yaml.safe_dump({"data": {"class_path": "lit_safety.data.eval.SafetyEvalDataModule",
                                               "init_args": {"harmful_data": "organism", "num_harmful": 5}}}))
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--config", str(config)])
    message = str(exit_info.value.code)
    assert f"data.init_args.harmful_data (in {config}) is now data.init_args.suite.harmful_data" in message
    assert f"data.init_args.num_harmful (in {config}) is now data.init_args.suite.num_harmful" in message


# -- issue 16: resume, reruns and one-line errors ----------------------------------------------------------------

TINY_SET = {
    "seed_everything": 0,
    "model": {"class_path": "lit_safety.modules.intervention.SafetyInterventionModule",
              "init_args": {"model": "organism-dense-unaligned:tiny", "intervention": "set",
                            "selection": {"method": "random", "ratio": 0.02}}},
    "data": {"class_path": "lit_safety.data.datamodules.RefusalDataModule",
             "init_args": {"num_samples": 16, "batch_size": 4, "max_length": 32, "val_fraction": 0.0}},
    "trainer": {"max_steps": 4, "accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
                "enable_model_summary": False, "limit_val_batches": 0,
                "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                               "init_args": {"every_n_train_steps": 3, "save_top_k": -1, "filename": "{step}"}}]}}


def tree(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (links as links) -> SHA-256 of files, link targets, 'dir'."""
    import hashlib

    seen = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            seen[key] = "-> " + str(path.readlink())
        elif path.is_dir():
            seen[key] = "dir"
        else:
            seen[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return seen


def test_resume_writes_to_the_command_lines_output_dir(tmp_path, tiny_dense_aligned):
    """Resuming run A's checkpoint with another --model.output_dir writes there, never into A's result;
    the other model arguments come from the checkpoint, and a difference is named in a warning."""
    config = tmp_path / "set.yaml"
    config.write_text(yaml.safe_dump(TINY_SET))
    out_a, out_b = tmp_path / "outA", tmp_path / "outB"
    main(["fit", "--config", str(config), "--model.output_dir", str(out_a), "--trainer.default_root_dir", str(out_a)])
    ckpt = out_a / "checkpoints" / "step=3.ckpt"
    assert ckpt.is_file()
    finished = tree(out_a)
    with pytest.warns(UserWarning) as caught:
        main(["fit", "--config", str(config), "--model.output_dir", str(out_b), "--trainer.default_root_dir", str(out_b),
              "--model.learning_rate", "0.02", "--trainer.max_steps", "5", "--ckpt_path", str(ckpt)])
    assert tree(out_a) == finished  # A's result, logs and checkpoints: untouched
    hparams = yaml.safe_load((out_b / "hparams.yaml").read_text())
    assert hparams["output_dir"] == str(out_b) and hparams["learning_rate"] == 0.001  # the checkpoint's rate
    assert json.loads((out_b / "summary.json").read_text())["steps"] == 5
    messages = [str(w.message) for w in caught if str(w.message).startswith("--ckpt_path")]
    assert messages == [f"--ckpt_path {ckpt}: the run resumes with the model arguments stored in the checkpoint "
                        "(except output_dir and overwrite, which this command line sets); ignored from the command "
                        "line and config: model.learning_rate=0.02 (checkpoint: 0.001)"]


def test_rerun_into_a_finished_output_dir_says_how_to_proceed(tmp_path, tiny_dense_aligned):
    config = tmp_path / "set.yaml"
    config.write_text(yaml.safe_dump({**TINY_SET, "trainer": {**TINY_SET["trainer"], "max_steps": 1, "callbacks": None,
                                                              "enable_checkpointing": False}}))
    out = tmp_path / "out"
    args = ["fit", "--config", str(config), "--model.output_dir", str(out), "--trainer.default_root_dir", str(tmp_path)]
    main(args)
    finished = tree(out)
    created = json.loads((out / ".result" / "manifest.json").read_text())["created"]
    from lit_safety.io import OutputDirError

    with pytest.raises(OutputDirError) as info:
        main(args)
    assert str(info.value) == (
        f"output_dir {out} already holds the finished result of another run "
        f"(SafetyInterventionModule, {created}: hparams.yaml, mask.safetensors, model, summary.json); nothing was "
        "written. To replace it, pass --model.overwrite true (overwrite=True in Python); to keep it, choose another "
        "--model.output_dir.")
    assert tree(out) == finished
    main([*args, "--model.overwrite", "true"])
    assert json.loads((out / ".result" / "manifest.json").read_text())["created"] >= created


@pytest.mark.parametrize("args, message", [
    (["--model.selection.ratio", "1.5"], "--model (ESIScoringModule): selection.ratio must be in (0, 1], got 1.5"),
    (["--model.selection.ratio", "0"], "--model (ESIScoringModule): selection.ratio must be in (0, 1], got 0.0"),
    (["--model.output_dir", "/nonexistent/dir/out"],
     "--model (ESIScoringModule): output_dir path /nonexistent/dir/out: parent directory /nonexistent/dir does not "
     "exist"),
])
def test_bad_model_arguments_are_one_line(args, message):
    from lit_safety.cli import ConfigurationError

    with pytest.raises(ConfigurationError) as info:
        main(["fit", "--config", str(REPO / "configs/esi.yaml"), "--model.model", "organism-moe-aligned", *args])
    assert str(info.value) == message


def test_unwritable_output_dir_stops_the_cli_before_any_work(read_only_dir, tmp_path):
    result = run_cli("fit", "--config", "configs/set.yaml", "--model.model", "organism-moe-unaligned",
                     "--model.output_dir", str(read_only_dir / "set"), "--trainer.default_root_dir", str(tmp_path))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"lit-safety fit: error: --model (SafetyInterventionModule): output_dir {read_only_dir / 'set'}: cannot "
        f"create files in {read_only_dir} (Operation not permitted)"
        if os.geteuid() == 0 else
        f"lit-safety fit: error: --model (SafetyInterventionModule): output_dir {read_only_dir / 'set'}: cannot "
        f"create files in {read_only_dir} (Permission denied)")
    assert "[organism]" not in result.stdout + result.stderr


def test_null_on_the_command_line_reaches_a_nested_option_as_none():
    """``--data.suite.task_data null`` skips the task set (jsonargparse hands it over as "None", which
    was then read as a file or hub id named None)."""
    cli = LitSafetyCLI(LightningModule, LightningDataModule, run=False, args=[
        "--config", str(REPO / "configs/eval.yaml"), "--data.suite.task_data", "null",
        "--data.suite.borderline_data", "builtin"])
    assert cli.datamodule.config.task_data is None and cli.datamodule.config.borderline_data == "builtin"
    assert cli.datamodule.config.harmful_data == "organism"
