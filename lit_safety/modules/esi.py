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

from lit_safety.esi.api import NEEDS_GRADIENTS, check_selection_args, select_mask
from lit_safety.esi.objectives import OBJECTIVES, make_objective
from lit_safety.esi.scoring import (
    Float32Gradients,
    ParameterFilter,
    clear_safety_gradients,
    scale_safety_gradients_,
    weighted_values,
)
from lit_safety.io import check_parent_exists
from lit_safety.modules.base import CausalLMModule


class ESIScoringModule(CausalLMModule):
    """Score every selected weight by Expected Safety Impact and save the top-k as a mask.

    Args:
        model: hub id, local HF directory or organism name.
        dtype: weights dtype when loading (bfloat16/float16 weights are still scored in float32:
            each batch's gradient is accumulated into a float32 buffer).
        trust_remote_code: run model code from the hub. Off unless you trust it.
        objective: ``refusal`` (log-likelihood of refusing), ``compliance`` (minus the
            log-likelihood of the harmful target) or ``judge`` (a guard model's "safe" logit on
            the model's own Gumbel-relaxed answer).
        method: ``esi`` (the paper), or a comparison baseline: ``bottom``, ``random``,
            ``magnitude``, ``grad``, ``snip``.
        ratio: fraction of the scored weights to select, in (0, 1] (ignored if ``k`` is set).
        k: number of weights to select instead of a ratio.
        scope: ``global`` (default: one top-k over all scored weights), ``per_tensor``, ``per_row``.
        include: regexes of parameter names to score (default: all decoder weight matrices).
        exclude: regexes of parameter names never scored.
        include_lm_head: score the output projection too (off by default).
        all_parameters: score every parameter: embeddings, norms, biases, MoE routers and the
            output projection too (default: decoder weight matrices only).
        guard_model: guard for ``objective=judge`` (hub id, directory or ``organism-guard``).
        guard_safe_token: the guard's "safe" verdict token.
        guard_unsafe_token: the guard's "unsafe" verdict token.
        guard_response_prefix: text the guard emits before its verdict ("\\n\\n" for Llama Guard 3).
        gumbel_temperature: Gumbel-softmax temperature of the judge objective.
        judge_max_new_tokens: length of the answers the judge objective generates.
        gradient_checkpointing: recompute activations in backward (less memory on large models).
        output_dir: where ``mask.safetensors`` and the report go.
        report: write the report (CSV/JSON/PNG) next to the mask.
        seed: seed of the random baseline and the Gumbel noise.
    """

    def __init__(
        self,
        model: str = "organism-dense-aligned",
        dtype: str = "float32",
        trust_remote_code: bool = False,
        objective: str = "refusal",
        method: str = "esi",
        ratio: float | None = 0.01,
        k: int | None = None,
        scope: str = "global",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        include_lm_head: bool = False,
        all_parameters: bool = False,
        guard_model: str | None = None,
        guard_safe_token: str = "safe",
        guard_unsafe_token: str | None = "unsafe",
        guard_response_prefix: str = "",
        gumbel_temperature: float = 0.3,
        judge_max_new_tokens: int = 32,
        gradient_checkpointing: bool = False,
        output_dir: str = "outputs/esi",
        report: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(model=model, dtype=dtype, trust_remote_code=trust_remote_code,
                         gradient_checkpointing=gradient_checkpointing)
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        check_selection_args(method, ratio if k is None else None, k, scope)
        if objective == "judge" and method in NEEDS_GRADIENTS and not guard_model:
            raise ValueError("objective=judge needs guard_model (e.g. organism-guard or meta-llama/Llama-Guard-3-1B)")
        check_parent_exists(output_dir, "output_dir")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.param_filter = ParameterFilter(include=include, exclude=exclude or [], include_lm_head=include_lm_head,
                                            keep_default_exclusions=not all_parameters)
        self.objective_fn = None
        if objective == "judge" and method in NEEDS_GRADIENTS:  # validates the guard's tokens now
            self.objective_fn = make_objective(
                "judge", guard_model=guard_model, safe_token=guard_safe_token, unsafe_token=guard_unsafe_token,
                guard_response_prefix=guard_response_prefix, temperature=gumbel_temperature,
                max_new_tokens=judge_max_new_tokens, seed=seed, trust_remote_code=trust_remote_code)
        elif objective != "judge":
            self.objective_fn = make_objective(objective)
        self.mask = None
        self.summary: dict[str, Any] | None = None
        self._examples = 0.0  # this rank's examples (padding copies carry weight 0 and do not count)
        self._float32_grads: Float32Gradients | None = None

    def configure_model(self) -> None:
        super().configure_model()
        self.scored = self.param_filter.select(self.model)
        scored = {id(p) for p in self.scored.values()}
        for p in self.model.parameters():  # only scored weights ever get a gradient buffer
            p.requires_grad_(id(p) in scored)
        if self.objective_fn is not None and hasattr(self.objective_fn, "bind"):
            self.objective_fn.bind(self.tokenizer)

    def configure_optimizers(self):
        return None

    def on_fit_start(self) -> None:
        # ESI takes the gradient of the deployed model, so the model stays in eval mode (no dropout)
        # on purpose through this "fit"; Lightning's check for eval-mode modules at the start of
        # training (it runs after this hook) would warn about every module of it.
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")

    def on_train_start(self) -> None:
        self.model.eval()  # the gradient of the deployed model: no dropout
        clear_safety_gradients(self.scored)
        self._examples = 0.0
        self._release_float32_grads()
        if self.hparams.method in NEEDS_GRADIENTS:
            # half-precision weights accumulate dS/dw in float32 (hooks only when single-process)
            self._float32_grads = Float32Gradients(self.scored)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self.hparams.method not in NEEDS_GRADIENTS:
            return None
        values = self.objective_fn(self.model, batch)
        # Padding copies (HarmfulPromptsDataModule under DDP/FSDP2) have weight 0: each prompt counts once.
        weighted, count = weighted_values(values, batch)
        # Sum now, divide by the number of examples at the end: dS/dw of the mean objective.
        self.manual_backward(weighted.sum())
        self._float32_grads.flush()  # after DDP's all-reduce / FSDP2's reduce-scatter
        self._examples += float(count)
        if float(count) > 0:  # the mean over the counted examples
            self.log("esi/safety_objective", weighted.detach().sum() / float(count), prog_bar=True,
                     batch_size=max(1, int(round(float(count)))))
        return None

    def _release_float32_grads(self) -> None:
        if self._float32_grads is not None:
            self._float32_grads.remove()
            self._float32_grads = None

    def on_train_epoch_end(self) -> None:
        self._release_float32_grads()
        total = float(self._examples)
        if self.hparams.method in NEEDS_GRADIENTS:
            local = torch.tensor(total, dtype=torch.float64, device=self.device)
            total = float(self.trainer.strategy.reduce(local, reduce_op="sum"))
            if total == 0:
                raise ValueError("ESI saw no examples: the harmful-prompt data set is empty")
            # DDP/FSDP average gradients over ranks; undo that and divide by the global count.
            scale_safety_gradients_(self.scored, multiply=self.trainer.world_size / total)
        hp = self.hparams
        meta = {"model": hp.model, "objective": hp.objective, "method": hp.method, "seed": hp.seed,
                "num_examples": int(round(total)), "dataset": _dataset_name(self.trainer.datamodule),
                "gradient_reduction": "mean over prompts"}
        self.mask = select_mask(self.scored, method=hp.method, ratio=hp.ratio if hp.k is None else None, k=hp.k,
                                scope=hp.scope, seed=hp.seed, metadata=meta)
        if self.trainer.is_global_zero:
            self._write_outputs()

    def teardown(self, stage: str) -> None:
        self._release_float32_grads()  # a run that failed mid-epoch leaves no hooks behind

    def _write_outputs(self) -> None:
        from lit_safety.esi.report import summarize_mask, text_summary, write_report

        out = Path(self.hparams.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.mask.save(out / "mask.safetensors")
        self.summary = summarize_mask(self.mask)
        if self.hparams.report:
            write_report(self.mask, out)
        for logger in self.loggers:
            logger.log_hyperparams({"esi/k": self.mask.k, "esi/n": self.mask.n})
        print(f"\nmask: {out / 'mask.safetensors'}\n{text_summary(self.summary)}")


def _dataset_name(datamodule: Any) -> str:
    if datamodule is None:
        return ""
    return str(getattr(datamodule, "data_path", None) or "organism corpus")
