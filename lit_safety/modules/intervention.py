"""``SafetyInterventionModule``: SET, SPA and their comparison baseline as one LightningModule.

- ``set``: train only the selected weights (SparseAdamW: optimizer state for the k selected
  entries only; every other parameter has ``requires_grad=False`` or keeps its values).
- ``spa``: train every weight except the selected ones, which stay bit-identical (FrozenEntries
  restores them after each optimizer step, whatever the optimizer).
- ``full``: plain fine-tuning of every weight (the baseline both are compared with).

Which weights are selected is the ``selection`` (:class:`~lit_safety.esi.selection.SelectionConfig`:
ESI, or a baseline such as ``random`` for "SET on a random 1%"). The mask comes from ``mask_path`` or
is computed at the start of fit by the same pipeline as :class:`ESIScoringModule`; it is stored in
checkpoints, so a resumed run keeps the same mask. At the end of fit the model is exported in HF
format (``output_dir/model``) with the tokenizer, the mask, the hyperparameters and a JSON summary,
published as one unit (:func:`~lit_safety.io.publish`): a reader, or a run killed at any moment,
sees the previous result or the new one, complete. ``output_dir`` is claimed at the start of fit
(writable, one run at a time, no finished result of another run replaced without ``overwrite``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch.utilities import rank_zero_info

from lit_safety.data.esi import HarmfulPromptsDataModule
from lit_safety.esi.api import compute_safety_mask
from lit_safety.esi.mask import SafetyMask
from lit_safety.esi.selection import SelectionConfig
from lit_safety.io import as_config, atomic_file, check_parent_exists, config_dict, publish, write_json
from lit_safety.modules.base import CausalLMModule, OutputDirClaim
from lit_safety.optim import FrozenEntries, SparseAdamW, prepare_model
from lit_safety.optim.precision import check_float32_master
from lit_safety.parallel import all_ranks_true, full_state_dict, is_dtensor, is_sharded

INTERVENTIONS = ("set", "spa", "full")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit", "sgd")
ARTIFACTS = ("model", "mask.safetensors", "hparams.yaml", "summary.json")
"""What SafetyInterventionModule publishes in its output_dir (``model/`` only with ``save_model``, the
mask only for set/spa)."""


class SafetyInterventionModule(OutputDirClaim, CausalLMModule):
    """Safety Enhancement Tuning (SET) or Safety Preserving Adaptation (SPA) of a causal LM.

    Args:
        model: hub id, local HF directory or organism name.
        intervention: ``set`` (train only the selected weights), ``spa`` (freeze them, train the
            rest) or ``full`` (train everything; no selection).
        selection: which weights, when no ``mask_path`` is given (``--model.selection.*``: method,
            ratio or k, scope, parameter filter, objective, seed).
        mask_path: a ``mask.safetensors`` from ESI scoring (``configs/esi.yaml``); ``None``
            computes it at fit start with ``selection``.
        esi_data_path: harmful prompts the selection scores (``None``: the organism corpus's).
        esi_num_samples: number of harmful prompts the selection scores.
        optimizer: ``adamw`` (SET always uses the sparse AdamW), ``adamw8bit`` (bitsandbytes 8-bit
            state, for SPA/full on GPUs; runs but is slow on CPU; not on FSDP2 shards),
            ``paged_adamw8bit`` (GPU only), or ``sgd``.
        learning_rate: peak learning rate.
        weight_decay: decoupled weight decay.
        warmup_steps: linear warmup steps (then constant).
        step_in_backward: SET only: apply each parameter's sparse update in its gradient hook and
            free the dense gradient at once (lowest memory; no gradient clipping/accumulation).
        gradient_checkpointing: recompute activations in backward to save memory.
        pack_sequences: train on each batch's sequences packed into one row without padding, logits
            only where a label is supervised: the same loss for less compute
            (:class:`~lit_safety.modules.base.CausalLMModule`); ``false`` trains on the padded batch,
            as runs before this option did.
        output_dir: where the HF model, mask and summary go (its parent must exist; checked for
            write access at construction). Published at the end of fit as one unit, which replaces
            an earlier result there as a whole. A resumed run (``--ckpt_path``) writes here, not to
            the output_dir stored in the checkpoint.
        save_model: export the trained model in HF format at the end of fit.
        overwrite: replace a finished result that ``output_dir`` already holds (another run's, or
            this config's previous run). Off: such a run stops at fit start, before any work, and
            says so; pass ``--model.overwrite true`` or choose another ``--model.output_dir``.
            Another run still writing into ``output_dir`` stops a run either way.
    """

    def __init__(
        self,
        model: str = "organism-dense-unaligned",
        dtype: str = "float32",
        trust_remote_code: bool = False,
        intervention: str = "set",
        selection: SelectionConfig = SelectionConfig(),
        mask_path: str | None = None,
        esi_data_path: str | None = None,
        esi_num_samples: int = 256,
        optimizer: str = "adamw",
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        step_in_backward: bool = False,
        gradient_checkpointing: bool = False,
        pack_sequences: bool = True,
        output_dir: str = "outputs/intervention",
        save_model: bool = True,
        overwrite: bool = False,
    ) -> None:
        super().__init__(model=model, dtype=dtype, trust_remote_code=trust_remote_code,
                         learning_rate=learning_rate, weight_decay=weight_decay,
                         gradient_checkpointing=gradient_checkpointing, pack_sequences=pack_sequences)
        if intervention not in INTERVENTIONS:
            raise ValueError(f"intervention must be one of {INTERVENTIONS}, got {intervention!r} (SET on a random "
                             "selection: intervention: set with selection.method: random)")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if mask_path is not None and not Path(mask_path).is_file():
            raise FileNotFoundError(f"mask_path {mask_path} does not exist")
        if step_in_backward and intervention != "set":
            raise ValueError("step_in_backward applies to intervention=set only")
        check_parent_exists(output_dir, "output_dir")
        self.selection = as_config(SelectionConfig, selection, "selection")
        self.save_config_hyperparameters(selection=self.selection)
        self.prepare_data_per_node = False  # the output_dir claim: once per run (global rank 0)
        self.mask: SafetyMask | None = None
        self.frozen = None
        self.frozen_verified: bool | None = None  # SPA: set at fit end (all ranks agree)
        self._fit_start = 0.0

    def output_dir_policy(self) -> dict[str, Any]:
        return {"job": type(self).__name__, "overwrite": bool(self.hparams.get("overwrite", False)),
                "artifacts": ARTIFACTS,
                "advice": "To replace it, pass --model.overwrite true (overwrite=True in Python); to keep it, choose "
                          "another --model.output_dir."}

    # -- mask ------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        super().configure_model()
        hp = self.hparams
        # from_pretrained returns the model in eval mode; fine-tuning runs in train mode (dropout as
        # the model defines it), like HF's Trainer. ESI scoring switches to eval mode and back.
        self.model.train()
        if hp.intervention == "full":
            return
        self.mask = self._resumed_mask() or self._load_or_compute_mask()
        self.mask.check_model(self.model)
        if self.mask.k == 0:
            raise ValueError(f"the mask selects no weight ({hp.mask_path or 'computed'}); nothing to train or freeze")
        if hp.intervention == "set":
            prepare_model(self.model, self.mask)
        else:
            self.frozen = FrozenEntries(self.model, self.mask)

    def _load_or_compute_mask(self) -> SafetyMask:
        hp = self.hparams
        if hp.mask_path is not None:
            return SafetyMask.load(hp.mask_path)
        if self._trainer is not None and not is_sharded(self.model):
            # Score on the training device (FSDP2 has already moved its shards there).
            self.model.to(self.trainer.strategy.root_device)
        prompts, targets = self._esi_prompts()
        return compute_safety_mask(
            self.model, self.tokenizer, prompts, targets=targets, selection=self.selection,
            objective=self.selection.make_objective(trust_remote_code=hp.trust_remote_code),  # a guard: loaded, used, freed
            metadata={"model": hp.model, "dataset": hp.esi_data_path or "organism corpus"},
            progress=self._trainer is None or self.trainer.is_global_zero)

    def _esi_prompts(self) -> tuple[list[str], list[str] | None]:
        data = HarmfulPromptsDataModule(tokenizer=self.hparams.model, data_path=self.hparams.esi_data_path,
                                        objective=self.selection.objective, num_samples=self.hparams.esi_num_samples,
                                        seed=self.selection.seed)
        return data.load_prompts()

    def _resumed_mask(self) -> SafetyMask | None:
        """The mask stored in the checkpoint a run resumes from (so it is never recomputed)."""
        ckpt_path = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
        if not ckpt_path or not Path(str(ckpt_path)).is_file():
            return None
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        stored = checkpoint.get("safety_mask")
        return _mask_from_state(stored) if stored else None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.mask is not None:
            checkpoint["safety_mask"] = _mask_state(self.mask)

    # -- training --------------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        if hp.intervention == "set":
            optimizer = SparseAdamW(self.model, self.mask, lr=hp.learning_rate, weight_decay=hp.weight_decay,
                                    step_in_backward=hp.step_in_backward)
        else:
            check_float32_master(self.model.named_parameters(), what=f"intervention={hp.intervention} with optimizer {hp.optimizer}")
            params = [p for p in self.model.parameters() if p.requires_grad]
            if hp.optimizer.endswith("adamw8bit") and any(is_dtensor(p) for p in params):
                raise ValueError(f"optimizer {hp.optimizer} (bitsandbytes) does not support FSDP2 DTensor shards; use "
                                 "optimizer adamw with configs/strategy/fsdp2.yaml, or adamw8bit with ddp / one device")
            if hp.optimizer == "paged_adamw8bit" and not params[0].is_cuda:
                raise ValueError("optimizer paged_adamw8bit pages optimizer state between GPU and CPU memory and needs "
                                 "a CUDA GPU; use adamw8bit (or adamw) on CPU")
            if hp.optimizer.endswith("adamw8bit"):
                import bitsandbytes as bnb

                cls = bnb.optim.PagedAdamW8bit if hp.optimizer == "paged_adamw8bit" else bnb.optim.AdamW8bit
                optimizer = cls(params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
            elif hp.optimizer == "sgd":
                optimizer = torch.optim.SGD(params, lr=hp.learning_rate, momentum=0.9, weight_decay=hp.weight_decay)
            else:
                optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
            if self.frozen is not None:
                self.frozen.attach(optimizer)
        if hp.warmup_steps <= 0:
            return optimizer
        warmup = hp.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_fit_start(self) -> None:
        self._fit_start = time.perf_counter()
        self.trainable_weights = self._count_trainable()
        total = sum(p.numel() for p in self.model.parameters())
        share = self.trainable_weights / total
        # Lightning's model summary counts every tensor that requires grad, i.e. for SET every matrix
        # holding one selected entry (~100% of the model); this is the number training can change.
        rank_zero_info(f"{self.hparams.intervention}: training {self.trainable_weights:,} of {total:,} weights "
                       f"({share:.2%} of the model)" + (" -- Lightning's 'Trainable params' counts every tensor "
                                                        "that holds a selected entry" if self.hparams.intervention
                                                        == "set" else ""))
        for logger in self.loggers:
            logger.log_hyperparams({"trainable_weights": self.trainable_weights, "trainable_share": share})

    def _count_trainable(self) -> int:
        """Weights that training can change."""
        if self.hparams.intervention == "set":
            return self.mask.k
        named = dict(self.model.named_parameters())
        total = sum(p.numel() for p in named.values() if p.requires_grad)
        if self.mask is not None:  # SPA: minus the frozen entries of still-trainable tensors
            total -= sum(int(idx.numel()) for n, idx in self.mask.indices.items() if named[n].requires_grad)
        return int(total)

    def on_fit_end(self) -> None:
        self.frozen_verified = None if self.frozen is None else all_ranks_true(self.frozen.verify())
        if self.frozen_verified is False:
            raise RuntimeError("SPA: a frozen weight changed during training")
        # Sharded weights are gathered (a collective: every rank takes part) and saved by rank 0.
        state_dict = full_state_dict(self.model) if self.hparams.save_model and is_sharded(self.model) else None
        if self.trainer.is_global_zero:
            self.export(Path(self.hparams.output_dir), state_dict=state_dict)

    # -- outputs ---------------------------------------------------------------------------------
    def export(self, out_dir: Path, state_dict: dict[str, torch.Tensor] | None = None,
               extra: dict[str, Any] | None = None) -> None:
        """Publish ``model/`` (HF format + tokenizer), ``mask.safetensors``, ``hparams.yaml`` and
        ``summary.json`` in ``out_dir`` as one unit (:func:`~lit_safety.io.publish`): they replace an
        earlier result there together, in one step, or not at all. ``extra``: more ``summary.json``
        fields (e.g. a driver's setting)."""
        summary = {**(extra or {}),
            "intervention": self.hparams.intervention, "selection": config_dict(self.selection),
            "model": self.hparams.model, "steps": int(self.trainer.global_step),
            "trainable_weights": getattr(self, "trainable_weights", None),
            "mask_k": self.mask.k if self.mask else None, "mask_n": self.mask.n if self.mask else None,
            "seconds": time.perf_counter() - self._fit_start,
            "frozen_verified": self.frozen_verified,
            "world_size": self.trainer.world_size,
        }
        with publish(out_dir, job=type(self).__name__, artifacts=ARTIFACTS) as stage:
            if self.hparams.save_model:
                model_dir = stage / "model"
                model_dir.mkdir()
                self.model.save_pretrained(model_dir, safe_serialization=True, state_dict=state_dict)
                self.tokenizer.save_pretrained(model_dir)
                _unwrap_architecture_name(model_dir, self.model)
            if self.mask is not None:
                self.mask.save(stage / "mask.safetensors")
            with atomic_file(stage / "hparams.yaml") as handle:
                yaml.safe_dump(dict(self.hparams), handle, sort_keys=False)
            write_json(stage / "summary.json", summary)


def _mask_state(mask: SafetyMask) -> dict[str, Any]:
    return {"indices": dict(mask.indices), "shapes": {n: list(s) for n, s in mask.shapes.items()},
            "metadata": {k: v for k, v in mask.metadata.items() if isinstance(v, (str, int, float, bool, type(None)))}}


def _mask_from_state(state: dict[str, Any]) -> SafetyMask:
    return SafetyMask(indices=dict(state["indices"]), shapes={n: tuple(s) for n, s in state["shapes"].items()},
                      metadata=dict(state["metadata"]))


def _unwrap_architecture_name(model_dir: Path, model: torch.nn.Module) -> None:
    """FSDP2 swaps the model's class for a subclass named ``FSDP<Original>``, which save_pretrained
    writes into config.json; put the original class name back."""
    if not is_sharded(model):
        return
    config_path = Path(model_dir) / "config.json"
    config = json.loads(config_path.read_text())
    config["architectures"] = [type(model).__bases__[-1].__name__]
    config_path.write_text(json.dumps(config, indent=2) + "\n")
