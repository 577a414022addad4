"""Callbacks that drop into existing Lightning projects.

    from lit_safety import SafetyPreservingCallback
    trainer = L.Trainer(callbacks=[SafetyPreservingCallback(mask="outputs/esi/mask.safetensors")])
    trainer.fit(my_module)   # any LightningModule; the masked weights stay bit-identical

``SafetyEvalCallback`` evaluates safety and utility (``SafetyEvaluator``) before, during and after fit.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_safety.esi.mask import MaskMismatchError, SafetyMask
from lit_safety.evaluation.evaluator import GenerationConfig, SafetyEvaluator, trainer_shows_progress
from lit_safety.evaluation.report import (build_report, format_table, logged_metrics, stage_entry, write_report,
                                          write_samples)
from lit_safety.evaluation.suite import EvalSuite, SuiteConfig
from lit_safety.io import as_config, write_json
from lit_safety.judges.base import Judge
from lit_safety.judges.builtin import default_judge
from lit_safety.judges.keyword import KeywordJudge
from lit_safety.models.loading import load_tokenizer
from lit_safety.optim import FrozenEntries
from lit_safety.optim.precision import float32_master_problem


def find_masked_module(pl_module: torch.nn.Module, mask: SafetyMask) -> torch.nn.Module:
    """The module whose parameter names are the mask's: the LightningModule itself, or the first
    child that holds them (``self.model`` wrapping an HF model, say)."""
    candidates = [pl_module] + [child for _, child in pl_module.named_children()]
    for candidate in candidates:
        names = dict(candidate.named_parameters())
        if all(name in names for name in mask.shapes):
            return candidate
    first = next(iter(mask.shapes))
    raise MaskMismatchError(
        f"no module of {type(pl_module).__name__} (nor its children) has the mask's parameter {first!r}; "
        f"the mask was made for {mask.metadata.get('model', 'another model')!r}"
    )


class SafetyPreservingCallback(L.Callback):
    """Keep a SafetyMask's weights bit-for-bit frozen while any LightningModule trains (SPA).

    Works with any optimizer (AdamW with weight decay, SGD, bitsandbytes 8-bit): the selected
    entries' gradients are zeroed and, after every optimizer step, their saved values are written
    back, so they end exactly as they started. Memory: the k selected values, no dense mask.

    Args:
        mask: a :class:`SafetyMask` or the path of a ``mask.safetensors``.
        verify_on_end: check at the end of fit that every frozen entry is unchanged (raises if not).
    """

    def __init__(self, mask: SafetyMask | str | os.PathLike, verify_on_end: bool = True) -> None:
        super().__init__()
        self.mask = mask if isinstance(mask, SafetyMask) else SafetyMask.load(mask)
        self.verify_on_end = verify_on_end
        self.frozen = None
        self._handles: list[Any] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Runs after configure_model and configure_optimizers, so parameters and optimizers exist.
        target = find_masked_module(pl_module, self.mask)
        self.mask.check_model(target)
        # The module's own optimizer may keep float32 masters (we cannot see it): warn, don't refuse.
        problem = float32_master_problem(target.named_parameters(), what=f"{type(pl_module).__name__}'s training")
        if problem:
            rank_zero_warn(problem + " (ignore this if your optimizer keeps float32 master weights)")
        self.frozen = FrozenEntries(target, self.mask)
        self._handles = [self.frozen.attach(optimizer) for optimizer in trainer.optimizers]

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.frozen is None:
            return
        if self.verify_on_end and not self.frozen.verify():
            raise RuntimeError(f"SafetyPreservingCallback: frozen weights moved (max drift {self.frozen.max_abs_drift()})")
        for handle in self._handles:
            handle.remove()
        self.frozen.remove()


class SafetyEvalCallback(L.Callback):
    """Evaluate safety and utility before training, every N steps, and after training.

    Each evaluation is :meth:`SafetyEvaluator.run` on this rank's shard of the suite (the same
    evaluator, metrics and report, :func:`build_report`, as ``lit-safety test``). Logs
    ``eval/<metric>`` to the Lightning logger (at step 0, N, ..., final) and writes
    ``eval_report.json`` (all stages), ``samples_<stage>.jsonl`` and before/after PNG plots to
    ``output_dir``. While training runs, finished stages go to ``eval_report.inprogress.json``;
    ``eval_report.json`` is only replaced once the last stage is done, so an interrupted run never
    overwrites an earlier complete report.

        trainer = L.Trainer(callbacks=[SafetyEvalCallback(SuiteConfig(harmful_data="advbench.csv"), every_n_steps=50)])

    Args:
        data: which prompts (the suite options of ``lit-safety test``; in YAML a mapping such as
            ``{harmful_data: advbench.csv, num_harmful: 100}``). Default: the organisms' held-out
            harmful, benign and task prompts, 200 each.
        judge: jailbreak judge. None (auto): :func:`~lit_safety.judges.builtin.default_judge` of the
            LightningModule's ``model_name``: the extended refusal-keyword judge for the organisms, the
            trained ``judge-minilm`` classifier otherwise (the keyword judge when it cannot be had).
        refusal_judge: keyword judge for refusal / over-refusal rates.
        before: evaluate before the first training step.
        after: evaluate when training ends.
        every_n_steps: also evaluate every N optimizer steps (0: never).
        max_new_tokens: answer length limit.
        batch_size: prompts per generate call.
        system_prompt: optional system message before every prompt.
        output_dir: report directory (default: ``<module output_dir>/eval`` when the module has
            one, else ``<trainer.default_root_dir>/eval``).
        tokenizer: tokenizer name or path when the LightningModule has no ``tokenizer`` attribute.
        model_attr: attribute of the LightningModule that holds the HF causal LM.
        save_samples: write every prompt, answer and verdict.
        plots: write PNG plots.
        progress: show a progress bar per evaluation set on stderr while it is generated, e.g.
            ``eval harmful (before): 100%|████| 200/200 [00:41<00:00, 4.8prompt/s]`` (stage
            ``before``, ``step_N`` or ``after``; global rank 0 only). Also off when the Trainer runs
            with ``enable_progress_bar=False``. False: silent.
    """

    def __init__(self, data: SuiteConfig | None = None, judge: Judge | None = None,
                 refusal_judge: KeywordJudge | None = None,
                 before: bool = True, after: bool = True, every_n_steps: int = 0, max_new_tokens: int = 64,
                 batch_size: int = 32, system_prompt: str | None = None, output_dir: str | None = None,
                 tokenizer: str | None = None, model_attr: str = "model", save_samples: bool = True,
                 plots: bool = True, progress: bool = True) -> None:
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        if not (before or after or every_n_steps):
            raise ValueError("SafetyEvalCallback has nothing to do: set before, after or every_n_steps")
        self.data = as_config(SuiteConfig, data, "SafetyEvalCallback data")
        self.judge = judge
        self.refusal_judge = refusal_judge
        self.before, self.after, self.every_n_steps = before, after, every_n_steps
        self.generation = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size,
                                           system_prompt=system_prompt)
        self.output_dir = output_dir
        self.tokenizer_name = tokenizer
        self.model_attr = model_attr
        self.save_samples, self.plots = save_samples, plots
        self.progress = progress
        self.stages: list[dict[str, Any]] = []
        self.suite: EvalSuite | None = None
        self.evaluator: SafetyEvaluator | None = None
        self.model_name: str | None = None
        self._tokenizer = None
        self._last_step = -1

    # -- setup ---------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.evaluator is not None:
            return
        self.suite = self.data.load()  # bad data fails here, before training
        self.model_name = getattr(pl_module, "model_name", None)
        judge = self.judge if self.judge is not None else default_judge(self.model_name or "")
        judge.setup()
        self.evaluator = SafetyEvaluator.for_suite(self.suite, judge, self.refusal_judge, generation=self.generation,
                                                   progress=self.progress)
        if self.output_dir is None:
            module_dir = getattr(getattr(pl_module, "hparams", {}), "get", lambda _: None)("output_dir")
            self.output_dir = os.path.join(module_dir or trainer.default_root_dir, "eval")

    def _model_and_tokenizer(self, pl_module: L.LightningModule) -> tuple[Any, Any]:
        model = getattr(pl_module, self.model_attr, None)
        if model is None or not hasattr(model, "generate"):
            raise AttributeError(f"SafetyEvalCallback: {type(pl_module).__name__}.{self.model_attr} is not an HF "
                                 "causal LM (set model_attr)")
        if self._tokenizer is None:
            if self.tokenizer_name is not None:
                self._tokenizer = load_tokenizer(self.tokenizer_name)
            elif getattr(pl_module, "tokenizer", None) is not None:
                self._tokenizer = pl_module.tokenizer
            else:
                raise AttributeError(f"SafetyEvalCallback: {type(pl_module).__name__} has no tokenizer attribute; "
                                     "pass tokenizer=<name or path>")
        return model, self._tokenizer

    # -- evaluation points ---------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.before:
            self.evaluate(trainer, pl_module, "before")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.evaluate(trainer, pl_module, f"step_{step}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.after and self._last_step != trainer.global_step:
            self.evaluate(trainer, pl_module, "after")
        elif self.after and self.stages:  # the last periodic evaluation is the final state
            self.stages[-1]["stage"] = "after"
        self._write(trainer, final=True)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> dict[str, Any]:
        """Run the whole suite on this rank's shard (a progress bar per set); metrics are synced,
        samples gathered. Returns the stage's report entry."""
        model, tokenizer = self._model_and_tokenizer(pl_module)
        self.evaluator.reset()
        self.evaluator.to(pl_module.device)  # metric states where the collectives run (NCCL needs CUDA)
        self.evaluator.progress = self.progress and trainer_shows_progress(trainer)
        started = time.perf_counter()
        self.evaluator.run(model, tokenizer, self.suite, stage=stage, rank=trainer.global_rank,
                           world_size=trainer.world_size)
        metrics = self.evaluator.compute()
        samples = self.evaluator.gather_samples() if self.save_samples else None  # a collective: every rank
        self._last_step = trainer.global_step
        entry = stage_entry(stage, trainer.global_step, metrics, time.perf_counter() - started)
        self.stages.append(entry)
        if trainer.is_global_zero:
            if trainer.logger is not None:
                trainer.logger.log_metrics(logged_metrics(metrics), step=trainer.global_step)
            if samples is not None:
                write_samples(os.path.join(self.output_dir, f"samples_{stage}.jsonl"), samples)
        self._write(trainer, final=False)
        return entry

    def _write(self, trainer: L.Trainer, final: bool) -> None:
        if not trainer.is_global_zero or not self.stages:
            return
        report = build_report(self.evaluator, self.suite.counts(), self.stages, model=self.model_name,
                              world_size=trainer.world_size)
        out = Path(self.output_dir)
        partial = out / "eval_report.inprogress.json"
        if not final:
            write_json(partial, report)
            return
        paths = write_report(out, report, None, plots=self.plots)
        partial.unlink(missing_ok=True)
        rank_zero_info("\n" + format_table(self.stages) + f"\n\nreport: {paths['report']}")
