"""Shared base of lit-safety's LightningModules: an HF causal LM loaded in ``configure_model``.

Loading in ``configure_model`` (not ``__init__``) is what lets sharded strategies (FSDP2 via
ModelParallelStrategy) build the model on the right device and wrap it before weights exist
everywhere at once: with a device mesh, every decoder layer and then the root are ``fully_shard``-ed.
"""

from __future__ import annotations

import inspect
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lit_safety.data.chat import IGNORE_INDEX
from lit_safety.generation import accepts_argument
from lit_safety.io import DirectoryLock, claim_output_dir, config_dict
from lit_safety.models.loading import load_model, load_tokenizer, resolve_dtype
from lit_safety.optim.precision import check_float32_master
from lit_safety.parallel import shard_model


class CausalLMModule(L.LightningModule):
    """Fine-tune a causal LM on (prompt, response) batches with loss on the response tokens.

    Args:
        model: Hugging Face hub id, local HF directory, or builtin organism name
            (``organism-dense-unaligned``, ``organism-dense-aligned``, ``organism-moe-unaligned``,
            ``organism-moe-aligned``; add ``:tiny`` for the seconds-to-build test size).
        dtype: weights dtype when loading (``float32``, ``bfloat16``, ``float16``, ``auto``).
        trust_remote_code: run model code shipped with a hub repository. Off unless you trust it.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        gradient_checkpointing: recompute activations in backward to save memory.
        pack_sequences: compute the training loss on the batch's sequences packed into one row
            without their padding, with output-layer logits only at the positions whose next token
            is supervised (:func:`packed_lm_loss`): the same loss as the padded batch's, with less
            compute and memory (``scripts/bench_packing.py``). Used when the model takes
            ``position_ids`` and ``logits_to_keep``, does not add a router loss, and a check on the
            first batch finds packed sequences isolated from each other
            (:func:`packing_isolates`); otherwise, or when off, the model's own loss on the padded
            batch.
    """

    def __init__(
        self,
        model: str = "organism-dense-unaligned",
        dtype: str = "float32",
        trust_remote_code: bool = False,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        gradient_checkpointing: bool = False,
        pack_sequences: bool = True,
    ) -> None:
        super().__init__()
        resolve_dtype(dtype)  # bad dtype: clear error before any loading
        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
        self.save_hyperparameters()  # subclasses call save_config_hyperparameters with their own arguments
        # Plain attributes, not hparams: a subclass's save_hyperparameters() replaces hparams.
        self.model_name = model
        self.model_dtype = dtype
        self.trust_remote_code = trust_remote_code
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.gradient_checkpointing = gradient_checkpointing
        self.pack_sequences = pack_sequences
        self._packing: bool | None = None  # decided on the first batch with two sequences (packing_isolates)
        self.model: torch.nn.Module | None = None
        self._tokenizer = None

    def save_config_hyperparameters(self, **configs: Any) -> None:
        """``save_hyperparameters()`` of the calling ``__init__``, with the config dataclasses
        (``selection=...``) stored as dicts: checkpoints stay loadable with ``weights_only=True``,
        and ``hparams.yaml`` stays plain YAML."""
        self.save_hyperparameters(ignore=list(configs), frame=inspect.currentframe().f_back)
        for name, config in configs.items():
            self.hparams[name] = config_dict(config)

    # -- model -------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model = load_model(self.model_name, dtype=self.model_dtype, trust_remote_code=self.trust_remote_code)
        if self.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
            self.model.config.use_cache = False
        if self.device_mesh is not None:  # ModelParallelStrategy (configs/strategy/fsdp2.yaml): FSDP2
            shard_model(self.model, self.device_mesh)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.model_name, trust_remote_code=self.trust_remote_code)
        return self._tokenizer

    def forward(self, **batch: Any):
        return self.model(**batch)

    # -- training ----------------------------------------------------------------------------------
    def _lm_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self._use_packing(batch):
            return packed_lm_loss(self.model, batch)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels") if k in batch}
        return self.model(**inputs).loss

    def _use_packing(self, batch: dict[str, torch.Tensor]) -> bool:
        if not self.pack_sequences or "labels" not in batch or "attention_mask" not in batch:
            return False
        if self._packing is None:
            if not can_pack(self.model):
                self._packing = False
            elif batch["input_ids"].shape[0] < 2:
                return True  # one sequence: nothing to keep apart
            else:
                self._packing = packing_isolates(self.model, batch)
                if not self._packing:
                    rank_zero_warn(f"{self.model_name}: sequences packed into one row attend to each other in this "
                                   "model, so it trains on padded batches (pack_sequences has no effect)")
        return self._packing

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._lm_loss(batch)
        self._check_finite_loss(loss, batch, batch_idx)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def _check_finite_loss(self, loss: torch.Tensor, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Stop training on a NaN/inf loss, in ``training_step``: before backward, so before any update
        (also SET's ``step_in_backward``, which updates in the gradient hooks). Every rank stops when
        one does (a collective decision), so no rank waits for the others forever."""
        finite = bool(torch.isfinite(loss).all())
        everywhere = finite if self._trainer is None else self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if everywhere:
            return
        where = (f"global_step {self.global_step} (batch {batch_idx} of epoch {self.current_epoch})"
                 if self._trainer is not None else f"batch {batch_idx}")
        if finite:
            raise RuntimeError(f"training loss is not finite on another rank at {where}; training stopped before this "
                               "step's update")
        labels = batch.get("labels")
        supervised = None if labels is None else int((labels != IGNORE_INDEX).sum())
        if supervised == 0:
            cause = ("the batch has no supervised token (every label is -100: the answers were cut by the data's "
                     "max_length, or are empty)")
        else:
            tokens = "" if supervised is None else f"the batch has {supervised} supervised tokens, so "
            cause = (f"{tokens}training diverged or a weight is not finite: lower learning_rate "
                     f"({self.learning_rate:g}) or warm it up, and check the model's weights and dtype")
        raise RuntimeError(f"training loss is {loss.item()} at {where}: {cause}; training stopped before this step's "
                           "update")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Warn when a run resumes mid-epoch from a checkpoint without the training loader's position
        (saved before the data modules' loaders were resumable): Lightning then restarts the epoch's
        batches from the first one, and the run no longer matches an uninterrupted one."""
        fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
        progress = fit_loop.get("epoch_loop.batch_progress", {})
        batches = progress.get("current", {}).get("ready", 0)
        if batches and not progress.get("is_last_batch") and not fit_loop.get("state_dict", {}).get("combined_loader"):
            path = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
            rank_zero_warn(f"checkpoint {path or ''} was saved after {batches} batches of an epoch without the training "
                           "data loader's position: this run trains on that epoch's batches from the first one again, "
                           "so it does not match an uninterrupted run (checkpoints written now store the position)")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._lm_loss(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def configure_optimizers(self):
        check_float32_master(self.model.named_parameters(), what=f"{type(self).__name__} (AdamW)")
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.learning_rate, weight_decay=self.weight_decay)


def can_pack(model: torch.nn.Module) -> bool:
    """Whether ``model``'s forward takes what :func:`packed_lm_loss` and :func:`packing_isolates`
    pass, and its loss is the token loss alone (a model that adds a router load-balancing loss,
    ``output_router_logits``, keeps its own loss)."""
    config = getattr(model, "config", None)
    return (all(accepts_argument(model, name) for name in ("position_ids", "logits_to_keep"))
            and hasattr(model, "get_input_embeddings") and not getattr(config, "output_router_logits", False))


def pack_batch(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids [1, N], position_ids [1, N], targets [N])``: the batch's tokens where
    ``attention_mask`` is set, row after row in one row, each row's positions counted from 0, and
    each token's target the row's next label (``IGNORE_INDEX`` at a row's last token), as the
    model's own loss shifts them."""
    keep = batch["attention_mask"].bool()
    labels = batch["labels"]
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    positions = batch["attention_mask"].long().cumsum(-1) - 1
    return batch["input_ids"][keep][None], positions[keep][None], targets[keep]


def packed_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean next-token cross-entropy over the supervised labels of a padded batch
    (``input_ids``, ``attention_mask``, ``labels`` with ``IGNORE_INDEX``), as the model's own loss
    gives it, computed on the sequences packed into one row (:func:`pack_batch`): no padding token
    is computed, and the output layer runs only at the positions whose next token is supervised.
    With ``position_ids`` and no attention mask, transformers keeps packed sequences apart by their
    positions (each restart at 0 begins a new sequence), which :func:`packing_isolates` checks."""
    input_ids, position_ids, targets = pack_batch(batch)
    supervised = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    out = model(input_ids=input_ids, position_ids=position_ids, use_cache=False, logits_to_keep=supervised)
    return torch.nn.functional.cross_entropy(out.logits[0].float(), targets[supervised])


def packing_isolates(model: torch.nn.Module, batch: dict[str, torch.Tensor], length: int = 8) -> bool:
    """Whether packed sequences are kept apart in ``model``: the output-layer logits of a batch's
    second sequence (its first ``length`` tokens), packed after the first, have a gradient of
    exactly zero with respect to the first one's input embeddings. Exact in any dtype: an attention
    weight that the mask zeroes passes no gradient, while a model that lets packed sequences attend
    to each other (one that ignores ``position_ids`` when it builds its mask) passes some."""
    rows = [ids[mask.bool()][:length] for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    first, second = rows[0], rows[1]
    positions = torch.cat([torch.arange(len(first)), torch.arange(len(second))])[None].to(first.device)
    keep = torch.arange(len(first), len(first) + len(second), device=first.device)
    embeds: list[torch.Tensor] = []

    def leaf(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        embeds.append(output.detach().requires_grad_(True))
        return embeds[-1]

    # The embeddings are taken in the model's own forward (a hook), not by calling the embedding
    # layer apart: a sharded model (FSDP2) gathers its weights only in its own forward.
    hook = model.get_input_embeddings().register_forward_hook(leaf)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            logits = model(input_ids=torch.cat([first, second])[None], position_ids=positions, use_cache=False,
                           logits_to_keep=keep).logits
            (grad,) = torch.autograd.grad(logits.float().sum(), embeds[0])
    finally:
        hook.remove()
        model.train(was_training)
    return not bool(grad[0, :len(first)].any())


class OutputDirClaim:
    """Mixin of the modules that publish a result in ``hparams.output_dir``: at the start of fit
    (``prepare_data``, global rank 0, before the data is tokenized, the model loaded or a mask
    computed) the directory is claimed with :func:`~lit_safety.io.claim_output_dir`: writable, not in
    use by another run (a lock, held until fit ends, however it ends), what killed runs left cleaned
    up, and a finished result of another run replaced only as :meth:`output_dir_policy` allows.
    Subclasses set ``self.prepare_data_per_node = False`` (one claim per run, not per node)."""

    _output_lock: DirectoryLock | None = None

    def output_dir_policy(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~lit_safety.io.claim_output_dir` besides the path."""
        raise NotImplementedError

    def prepare_data(self) -> None:
        if self._trainer is None or self.trainer.state.fn != "fit":
            return
        if self._output_lock is None or self._output_lock.released:
            self._output_lock = claim_output_dir(self.hparams.output_dir, **self.output_dir_policy())

    def release_output_dir(self) -> None:
        if self._output_lock is not None:
            self._output_lock.release()
            self._output_lock = None

    def configure_callbacks(self) -> list[L.Callback]:
        return [ReleaseOutputDir()]


class ReleaseOutputDir(L.Callback):
    """Releases an :class:`OutputDirClaim` module's output directory when fit ends or fails."""

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if isinstance(pl_module, OutputDirClaim):
            pl_module.release_output_dir()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(pl_module, OutputDirClaim):
            pl_module.release_output_dir()
