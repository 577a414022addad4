"""``lit-safety``: LightningCLI for every job, plus ``lit-safety organism`` for the model organisms.

    lit-safety fit --config configs/set.yaml            # train (SET/SPA/...), configured by YAML
    lit-safety fit --config configs/set.yaml --print_config
    lit-safety organism build organism-dense-aligned     # build/cache an organism now
    lit-safety organism eval organism-dense-aligned      # its refusal/answer rates
    lit-safety models list                               # every builtin model name and its cache state
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path
from dataclasses import fields
from typing import Any

import argparse

import jsonargparse
import yaml
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_warn

import lit_safety
from lit_safety.esi.selection import METHODS, SelectionConfig
from lit_safety.evaluation.suite import SuiteConfig
from lit_safety.io import OutputDirError
from lit_safety.organism.cli import organism_main, print_listing
from lit_safety.registry import model_listing

# Dataclass fields documented by a string right below them (SelectionConfig, SuiteConfig) get
# that string as their --help text, as in litgpt.
jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)

DESCRIPTION = (
    "lit-safety: find the safety-critical weights of a causal LM (ESI) and intervene on them "
    "(SET, SPA). Subcommands fit/validate/test/predict take a --config YAML from configs/. "
    "Model organisms: 'lit-safety organism --help'; every builtin model name: 'lit-safety models list'."
)


FROM_COMMAND_LINE = ("output_dir", "overwrite")
"""Model arguments that a resumed run (``--ckpt_path``) takes from its command line and config, not
from the checkpoint: where this run writes, and whether it may replace a result there."""


class ConfigurationError(ValueError):
    """A class of the config refused its arguments; the message is one line naming the section,
    the class and the argument (the cause keeps the whole traceback)."""


class LitSafetyCLI(LightningCLI):
    """LightningCLI with lit-safety's defaults: model and data chosen by class in the config.

    With ``--ckpt_path``, LightningCLI replaces every model argument by the one stored in the
    checkpoint; here ``output_dir`` and ``overwrite`` stay as the command line and config say (a
    resumed run must not write into the directory of the run it resumes from), and a warning names
    every other argument whose given value the checkpoint's replaces. A class that refuses its
    arguments is a one-line :class:`ConfigurationError`, not jsonargparse's traceback.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"description": DESCRIPTION})
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        # The data module tokenizes with the model's own tokenizer, and pairs each prompt with the
        # target the model's objective needs (refusal / compliance / none for judge).
        parser.link_arguments("model.init_args.model", "data.init_args.tokenizer", apply_on="parse")
        parser.link_arguments("model.init_args.selection.objective", "data.init_args.objective", apply_on="parse")

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        given = self.config[subcommand].get("model") if ckpt_path and Path(ckpt_path).is_file() else None
        if given is None:
            return super()._parse_ckpt_path()
        given = given.clone()
        super()._parse_ckpt_path()
        resumed = self.config[subcommand]["model"]
        before, after = _flat_init_args(given), _flat_init_args(resumed)
        for key in FROM_COMMAND_LINE:
            if key in before:
                resumed["init_args"][key] = given["init_args"][key]
        ignored = [f"model.{key}={before[key]!r} (checkpoint: {after.get(key)!r})"
                   for key in sorted(before) if key not in FROM_COMMAND_LINE and key in after and before[key] != after[key]]
        if given.get("class_path") != resumed.get("class_path"):
            ignored.insert(0, f"model.class_path={given.get('class_path')} (checkpoint: {resumed.get('class_path')})")
        if ignored:
            rank_zero_warn(f"--ckpt_path {ckpt_path}: the run resumes with the model arguments stored in the "
                           f"checkpoint (except {' and '.join(FROM_COMMAND_LINE)}, which this command line sets); "
                           f"ignored from the command line and config: {', '.join(ignored)}")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, OSError) as err:
            cause = _chain(err)[-1]
            if not _raised_by_lit_safety(cause):  # not a message written for users: keep the traceback
                raise
            raise ConfigurationError(f"{self._section_of(err)}{cause}") from err

    def _section_of(self, err: BaseException) -> str:
        """``--model (ClassName): `` for the config section whose class refused its arguments."""
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        text = "\n".join(str(e) for e in _chain(err))
        for section in ("model", "data"):
            class_path = getattr(config.get(section), "class_path", None)
            if class_path and re.search(rf"class_path='{re.escape(class_path)}'", text):
                return f"--{section} ({class_path.rsplit('.', 1)[-1]}): "
        return ""


def _flat_init_args(namespace: Any) -> dict[str, Any]:
    """A model config's init arguments as {"selection.ratio": 0.01, ...}."""
    init = namespace.get("init_args") if namespace is not None else None
    if init is None:
        return {}
    values = init.as_dict() if hasattr(init, "as_dict") else dict(init)
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}{key}.", item)
        else:
            flat[prefix[:-1]] = value

    walk("", values)
    return flat


def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and the exceptions it was raised from (``from None`` ends the chain), outermost first."""
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        chain.append(err)
        err = err.__cause__ if err.__cause__ is not None else None if err.__suppress_context__ else err.__context__
    return chain


def _raised_by_lit_safety(err: BaseException) -> bool:
    """Whether ``err`` was raised in lit-safety's own code (a message written for users)."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename.startswith(str(Path(lit_safety.__file__).parent) + "/")


RENAMED: dict[str, dict[str, str]] = {
    "ESIScoringModule": {f.name: f"selection.{f.name}" for f in fields(SelectionConfig)},
    "SafetyInterventionModule": {
        "method": "intervention (set | spa | full; the old 'random' is intervention: set with selection.method: random)",
        **{key: f"selection.{key}" for key in ("ratio", "scope", "objective", "include_lm_head", "all_parameters",
                                               "seed")}},
    "SafetyEvalDataModule": {f.name: f"suite.{f.name}" for f in fields(SuiteConfig)},
}
"""Init arguments of earlier versions: class name -> {old key: where it went}."""


def check_renamed_keys(argv: Sequence[str]) -> None:
    """Stop with a message that names the new key when a config file or a ``--model.*`` argument
    uses an init argument of an earlier version (before jsonargparse's generic "unknown key")."""
    problems = []
    for section, class_name, key, value, where in scan_init_args(argv)[1]:
        renamed = RENAMED.get(class_name, {})
        if key in renamed and where.startswith("--"):
            problems.append(f"--{section}.{key} is now --{section}.{renamed[key]}")
        elif key in renamed:
            problems.append(f"{section}.init_args.{key} (in {where}) is now {section}.init_args.{renamed[key]}")
        elif key == "selection" and value in METHODS and class_name in RENAMED:  # the old `selection: esi`
            problems.append(f"{section}.init_args.selection: {value} (in {where}) is now a group of options: "
                            f"{section}.init_args.selection.method: {value}")
    if problems:
        raise SystemExit("lit-safety: renamed option(s):\n  " + "\n  ".join(problems) +
                         "\n(see lit-safety fit --config <config> --help)")


def scan_init_args(argv: Sequence[str]) -> tuple[dict[str, str], list[tuple[str, str, str, Any, str]]]:
    """What the config files and ``--model``/``--data`` arguments in ``argv`` choose, in order:
    the class path per section (the last one wins), and (section, class name, init-arg key,
    value, where) for every init argument they set."""
    classes: dict[str, str] = {}
    entries = []
    for i, arg in enumerate(argv):
        name, _, inline = arg.partition("=")
        value = inline if inline else (argv[i + 1] if i + 1 < len(argv) else None)
        if name == "--config" and value and Path(value).is_file():
            config = yaml.safe_load(Path(value).read_text()) or {}
            for section in ("model", "data"):
                spec = config.get(section)
                if isinstance(spec, dict) and spec.get("class_path"):
                    classes[section] = str(spec["class_path"])
                    init = spec.get("init_args") or {k: v for k, v in spec.items() if k != "class_path"}
                    entries += [(section, classes[section].rsplit(".", 1)[-1], key, v, value) for key, v in init.items()]
        for section in ("model", "data"):
            if name in (f"--{section}", f"--{section}.class_path") and value and not value.endswith((".yaml", ".yml")):
                classes[section] = value
            elif name.startswith(f"--{section}.") and section in classes and not name.endswith(".help"):
                key = name[len(f"--{section}."):].removeprefix("init_args.")  # nested: "selection.ratio"
                entries.append((section, classes[section].rsplit(".", 1)[-1], key, value, arg))
    return classes, entries


def models_main(argv: Sequence[str]) -> None:
    """``lit-safety models list``: the builtin names any ``model:`` option accepts."""
    parser = argparse.ArgumentParser(
        prog="lit-safety models",
        description="Builtin model names that any config's model option accepts besides hub ids, local HF "
        "directories and GGUF files (path/to/x.gguf or <dir or hub id>::<file>.gguf): the model organisms, "
        "the real pretrained models that pip ships, and the trained judges, with their cache state under "
        "$LIT_SAFETY_CACHE (default ~/.cache/lit_safety).")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list builtin model names, whether each is built/converted, and where")
    parser.parse_args(list(argv))
    print_listing(model_listing())


def main(args: Sequence[str] | None = None) -> None:
    """The ``lit-safety`` command. From the command line (``args`` None), a config class that refuses
    its arguments (:class:`ConfigurationError`) or an output directory the run must not use
    (:class:`~lit_safety.io.OutputDirError`) ends the process with that one line on stderr; called
    with ``args`` from Python, they are raised."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "organism":
        organism_main(argv[1:])
        return
    if argv and argv[0] == "models":
        models_main(argv[1:])
        return
    check_renamed_keys(argv)
    model_class = scan_init_args(argv)[0].get("model")
    if model_class and ("--help" in argv or "-h" in argv) and not any(a.startswith("--model.help") for a in argv):
        # LightningCLI's --help lists the model only as --model CLASS; with a config that names
        # the class, add that class's own options (grouped, e.g. --model.selection.*) below it.
        try:
            LitSafetyCLI(LightningModule, LightningDataModule, args=argv)
        except SystemExit as done:
            if done.code not in (0, None):
                raise
        print(f"\n{model_class.rsplit('.', 1)[-1]} options (the config's model; also: --model.help CLASS):\n", flush=True)
        rest = [a for a in argv if a not in ("--help", "-h")]
        LitSafetyCLI(LightningModule, LightningDataModule, args=[*rest, "--model.help", model_class])
        return
    try:
        LitSafetyCLI(LightningModule, LightningDataModule, args=None if args is None else argv)
    except (ConfigurationError, OutputDirError) as err:  # bad arguments, or an output_dir the run must not use
        if args is not None:  # called from Python: the exception, whose message is that one line
            raise
        subcommand = next((f" {a}" for a in argv if not a.startswith("-")), "")
        raise SystemExit(f"lit-safety{subcommand}: error: {err}") from None


if __name__ == "__main__":
    main()
