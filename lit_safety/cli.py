"""``lit-safety``: LightningCLI for every job, plus ``lit-safety organism`` for the model organisms.

    lit-safety fit --config configs/set.yaml            # train (SET/SPA/...), configured by YAML
    lit-safety fit --config configs/set.yaml --print_config
    lit-safety organism build organism-dense-aligned     # build/cache an organism now
    lit-safety organism eval organism-dense-aligned      # its refusal/answer rates
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from lightning.pytorch.cli import LightningCLI

DESCRIPTION = (
    "lit-safety: find the safety-critical weights of a causal LM (ESI) and intervene on them "
    "(SET, SPA). Subcommands fit/validate/test/predict take a --config YAML from configs/. "
    "Model organisms: 'lit-safety organism --help'."
)


class LitSafetyCLI(LightningCLI):
    """LightningCLI with lit-safety's defaults: model and data chosen by class in the config."""

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
        parser.link_arguments("model.init_args.objective", "data.init_args.objective", apply_on="parse")


def main(args: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "organism":
        from lit_safety.organism.cli import organism_main

        organism_main(argv[1:])
        return
    from lightning.pytorch import LightningDataModule, LightningModule

    LitSafetyCLI(LightningModule, LightningDataModule, args=None if args is None else argv)


if __name__ == "__main__":
    main()
