"""``SafetyEvalModule``: ``lit-safety test --config configs/eval.yaml`` on any model or organism.

Each test step hands one batch of this rank's prompts (``SafetyEvalDataModule``) to
:meth:`SafetyEvaluator.update`, which generates, judges and updates the torchmetrics; at the end
the synced metrics are logged, printed as a table, and written as ``eval_report.json``
(:func:`build_report`) + ``samples.jsonl`` + plots in ``output_dir`` (atomically, and only when
the whole evaluation has finished).

While it runs, each set's generation pass shows its own bar on stderr (rank 0), in place of
Lightning's anonymous "Testing DataLoader N" bar::

    eval harmful (test): 100%|██████████| 200/200 [00:41<00:00, 4.83prompt/s]
    eval benign (test):   38%|███▊      | 76/200 [00:15<00:25, 4.91prompt/s]
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from lit_safety.evaluation.evaluator import GenerationConfig, SafetyEvaluator, trainer_shows_progress
from lit_safety.evaluation.report import build_report, format_table, logged_metrics, stage_entry, write_report
from lit_safety.evaluation.suite import EvalRecord, EvalSuite
from lit_safety.io import check_parent_exists
from lit_safety.judges.base import Judge
from lit_safety.judges.builtin import default_judge
from lit_safety.judges.keyword import KeywordJudge
from lit_safety.models.loading import load_model, quantization_config
from lit_safety.modules.base import CausalLMModule


class SafetyEvalModule(CausalLMModule):
    """Safety and utility evaluation: attack success rate, refusal, over-refusal, task accuracy.

    Args:
        model: hub id, local HF directory or organism name.
        dtype: weights dtype when loading.
        trust_remote_code: run model code from the hub. Off unless you trust it.
        quantization: ``8bit`` or ``4bit`` (bitsandbytes, CUDA) to evaluate a large model on a small
            GPU; null loads ``dtype`` weights.
        judge: decides whether an answer to a harmful prompt is a jailbreak. null (auto,
            :func:`~lit_safety.judges.builtin.default_judge` of ``model``): the extended
            refusal-keyword judge for the organisms, the trained ``judge-minilm`` classifier for other
            models (the keyword judge, with one log line, when it cannot be had). E.g.
            ``{class_path: lit_safety.judges.GuardJudge, init_args: {model: organism-guard}}``,
            ``lit_safety.judges.ClassifierJudge``, ``lit_safety.judges.ApiJudge``. With a non-keyword
            judge the report also has the keyword judge's ASR (``harmful_keyword_asr``).
        refusal_judge: keyword judge for refusal and over-refusal rates when ``judge`` does not
            detect refusals (default: ``judge`` when it is a keyword judge, else GCG's list).
        max_new_tokens: answer length limit.
        do_sample: sample instead of greedy decoding.
        temperature: sampling temperature.
        top_p: nucleus sampling mass.
        system_prompt: optional system message before every prompt.
        output_dir: where eval_report.json, samples.jsonl and the plots go.
        save_samples: also write every prompt, answer and verdict to samples.jsonl.
        plots: write PNG plots.
        progress: show a progress bar per evaluation set on stderr (``eval harmful (test)``,
            counting prompts; global rank 0 only), which replaces Lightning's test bar for the run.
            Also off when the Trainer runs with ``enable_progress_bar=False``. False: no bars of
            lit-safety's own (Lightning's test bar, if enabled, stays).
    """

    def __init__(
        self,
        model: str = "organism-dense-aligned",
        dtype: str = "float32",
        trust_remote_code: bool = False,
        quantization: str | None = None,
        judge: Judge | None = None,
        refusal_judge: KeywordJudge | None = None,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        system_prompt: str | None = None,
        output_dir: str = "outputs/eval",
        save_samples: bool = True,
        plots: bool = True,
        progress: bool = True,
    ) -> None:
        super().__init__(model=model, dtype=dtype, trust_remote_code=trust_remote_code)
        self.save_hyperparameters(ignore=["judge", "refusal_judge"])
        self.quantization = quantization_config(quantization, compute_dtype=dtype if dtype != "float32" else "bfloat16")
        # batch_size: the data module's, set in setup (one generate() call per test batch).
        self.generation = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                           top_p=top_p, system_prompt=system_prompt)
        self.judge = judge
        """The jailbreak judge; None until ``setup`` chooses :func:`default_judge` of the model."""
        self.refusal_judge = refusal_judge
        self.output_dir = str(check_parent_exists(output_dir, "output_dir"))
        self.save_samples = save_samples
        self.plots = plots
        self.progress = progress
        self._paused_bar: Any = None
        self.evaluator: SafetyEvaluator | None = None
        self.suite: EvalSuite | None = None
        self.results: dict[str, Any] = {}
        """The metrics of the last evaluation (also in eval_report.json)."""
        self._started = 0.0

    def configure_model(self) -> None:
        if self.model is not None or self.quantization is None:
            return super().configure_model()
        # bitsandbytes places the quantized weights on the GPU itself (device_map).
        self.model = load_model(self.model_name, dtype=self.model_dtype, trust_remote_code=self.trust_remote_code,
                                quantization_config=self.quantization, device_map={"": torch.cuda.current_device()})

    def setup(self, stage: str) -> None:
        if stage != "test":
            raise RuntimeError(f"SafetyEvalModule only evaluates: run `lit-safety test`, not {stage!r}")
        if self.judge is None:
            self.judge = default_judge(self.model_name)
        self.judge.setup()  # a missing judge model / token / endpoint fails before the model loads
        datamodule = self.trainer.datamodule
        if not hasattr(datamodule, "load"):
            raise TypeError("SafetyEvalModule needs a SafetyEvalDataModule (or a data module whose load() returns "
                            "an EvalSuite)")
        self.suite = datamodule.load()
        generation = replace(self.generation, batch_size=getattr(datamodule, "batch_size", self.generation.batch_size))
        progress = self.progress and trainer_shows_progress(self.trainer)
        self.evaluator = SafetyEvaluator.for_suite(self.suite, self.judge, self.refusal_judge, generation=generation,
                                                   progress=progress)
        if progress:
            # The per-set bars say which set runs and count prompts; Lightning's bar would only repeat
            # the same batches as "Testing DataLoader N". Paused for this run, resumed in teardown.
            self._paused_bar = self.trainer.progress_bar_callback
            self._paused_bar.disable()

    def teardown(self, stage: str) -> None:
        if self.evaluator is not None:
            self.evaluator.end()
        if self._paused_bar is not None:
            self._paused_bar.enable()
            self._paused_bar = None

    def on_test_start(self) -> None:
        self._started = time.perf_counter()
        self.evaluator.begin(self.suite.counts(), stage="test", world_size=self.trainer.world_size)

    def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
        return batch  # records are text; tokenization happens in the evaluator, on the model's device

    def test_step(self, batch: list[EvalRecord], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluator.update(self.model, self.tokenizer, batch)

    def on_test_epoch_end(self) -> None:
        self.evaluator.end()  # the last set's bar is done before the table is printed
        metrics = self.evaluator.compute()
        samples = self.evaluator.gather_samples() if self.save_samples else None  # a collective: every rank
        self.results = metrics
        if not self.trainer.is_global_zero:
            return
        if self.logger is not None:
            # Straight to the logger: self.log here would repeat every value once per test dataloader.
            self.logger.log_metrics(logged_metrics(metrics), step=0)
        stage = stage_entry("test", None, metrics, time.perf_counter() - self._started)
        report = build_report(self.evaluator, self.suite.counts(), [stage], model=self.model_name,
                              world_size=self.trainer.world_size)
        paths = write_report(self.output_dir, report, samples, plots=self.plots)
        rank_zero_info("\n" + format_table(report["stages"]) + f"\n\nreport: {paths['report']}")

    def configure_optimizers(self) -> Any:
        return None
