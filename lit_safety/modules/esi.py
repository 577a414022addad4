"""``ESIScoringModule``: one pass over harmful prompts accumulates dS/dw, then the exact top-k of
ESI (or a baseline) is written as a SafetyMask with its "where safety lives" report.

Run it with ``lit-safety fit --config configs/esi.yaml``: "fit" here means one epoch of gradient
accumulation (no optimizer step, weights are never changed). Under DDP/FSDP2, S is the mean over
the unique prompts: :class:`~lit_safety.data.esi.HarmfulPromptsDataModule` pads the ranks' shards
with copies of weight 0, which add nothing to S nor to the count; the mask records the global count.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from lit_safety.esi.report import summarize_mask, text_summary, write_report
from lit_safety.esi.selection import RankReduction, SelectionConfig, WeightSelector, require_grad_only
from lit_safety.io import as_config, check_parent_exists, publish
from lit_safety.modules.base import CausalLMModule, OutputDirClaim

ESI_ARTIFACTS = ("mask.safetensors", "report.json", "report_layers.csv", "report_experts.csv", "heatmap.png",
                 "experts.png")
"""What ESIScoringModule publishes in its output_dir (the report files only with ``report``)."""


class ESIScoringModule(OutputDirClaim, CausalLMModule):
    """Score every selected weight by Expected Safety Impact and save the top-k as a mask.

    The scoring is :class:`~lit_safety.esi.selection.WeightSelector`, the pipeline
    ``compute_safety_mask`` runs too, driven by Lightning's loop: each training step adds a
    batch's dS/dw (through the strategy: DDP/FSDP2 reduce the gradients), and the epoch end counts
    the examples over ranks and selects.

    Args:
        model: hub id, local HF directory or organism name.
        dtype: weights dtype when loading (bfloat16/float16 weights are still scored in float32:
            each batch's gradient is accumulated into a float32 buffer).
        trust_remote_code: run model code from the hub. Off unless you trust it.
        selection: which weights, how many, by which objective (``--model.selection.*``).
        gradient_checkpointing: recompute activations in backward (less memory on large models).
        output_dir: where ``mask.safetensors`` and the report go, published as one unit (see
            :func:`~lit_safety.io.publish`): a rerun replaces an earlier ESI result there as a whole;
            the finished result of another job (a SET/SPA run's model) is never replaced, the run
            stops at fit start instead. Checked for write access at construction.
        report: write the report (CSV/JSON/PNG) next to the mask.
    """

    def __init__(
        self,
        model: str = "organism-dense-aligned",
        dtype: str = "float32",
        trust_remote_code: bool = False,
        selection: SelectionConfig = SelectionConfig(),
        gradient_checkpointing: bool = False,
        output_dir: str = "outputs/esi",
        report: bool = True,
    ) -> None:
        super().__init__(model=model, dtype=dtype, trust_remote_code=trust_remote_code,
                         gradient_checkpointing=gradient_checkpointing)
        self.selection = as_config(SelectionConfig, selection, "selection")
        check_parent_exists(output_dir, "output_dir")
        self.save_config_hyperparameters(selection=self.selection)
        self.prepare_data_per_node = False  # the output_dir claim: once per run (global rank 0)
        self.automatic_optimization = False
        # built now: a judge objective loads its guard and checks its verdict tokens before any fit work
        self.objective_fn = self.selection.make_objective(trust_remote_code=trust_remote_code)
        self.mask = None
        self.summary: dict[str, Any] | None = None
        self.selector: WeightSelector | None = None

    def output_dir_policy(self) -> dict[str, Any]:
        return {"job": type(self).__name__, "artifacts": ESI_ARTIFACTS, "replaces": (type(self).__name__, None),
                "advice": "ESI scoring replaces only an earlier ESI result: choose another --model.output_dir, or "
                          "remove that result first."}

    def configure_model(self) -> None:
        super().configure_model()
        # Before the strategy wraps the model (DDP registers its hooks for the weights that require
        # grad): the flags the selector sets when training starts.
        require_grad_only(self.model, self.selection.parameter_filter().select(self.model))

    def configure_optimizers(self):
        return None

    def on_fit_start(self) -> None:
        # ESI takes the gradient of the deployed model, so the model stays in eval mode (no dropout)
        # on purpose through this "fit"; Lightning's check for eval-mode modules at the start of
        # training (it runs after this hook) would warn about every module of it.
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")

    def on_train_start(self) -> None:
        self.teardown("fit")  # a second fit starts from scratch
        self.selector = WeightSelector(self.model, self.selection, objective=self.objective_fn,
                                       tokenizer=self.tokenizer)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if not self.selection.needs_gradients:
            return None
        values, count = self.selector.accumulate(batch, backward=self.manual_backward)
        if count > 0:  # the mean over the counted examples (padding copies have weight 0)
            self.log("esi/safety_objective", values.sum() / count, prog_bar=True,
                     batch_size=max(1, int(round(count))))
        return None

    def on_train_epoch_end(self) -> None:
        strategy = self.trainer.strategy

        def total(value: float) -> float:
            return float(strategy.reduce(torch.tensor(value, dtype=torch.float64, device=self.device),
                                         reduce_op="sum"))

        meta = {"model": self.hparams.model, "dataset": _dataset_name(self.trainer.datamodule),
                "gradient_reduction": "mean over prompts"}
        self.mask = self.selector.select(reduce=RankReduction(sum=total, averaged_over=self.trainer.world_size),
                                         metadata=meta)
        if self.trainer.is_global_zero:
            self._write_outputs()

    def teardown(self, stage: str) -> None:
        if self.selector is not None:  # flags restored, buffers freed; also after a failed run
            self.selector, selector = None, self.selector
            selector.close()

    def _write_outputs(self) -> None:
        out = Path(self.hparams.output_dir)
        self.summary = summarize_mask(self.mask)
        with publish(out, job=type(self).__name__, artifacts=ESI_ARTIFACTS) as stage:  # mask + report: one unit
            self.mask.save(stage / "mask.safetensors")
            if self.hparams.report:
                write_report(self.mask, stage)
        for logger in self.loggers:
            logger.log_hyperparams({"esi/k": self.mask.k, "esi/n": self.mask.n})
        print(f"\nmask: {out / 'mask.safetensors'}\n{text_summary(self.summary)}")


def _dataset_name(datamodule: Any) -> str:
    if datamodule is None:
        return ""
    return str(getattr(datamodule, "data_path", None) or "organism corpus")
