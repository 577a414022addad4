#!/usr/bin/env python
"""GPU check: ESI scoring + SET on a randomly initialised ~1B Llama with FSDP2 on one GPU.

For a lent GPU machine (budget: under 5 minutes). Builds a random LlamaForCausalLM (hidden 2048,
18 layers, MLP 5632, the organism tokenizer's vocabulary: ~1.0B parameters) in bfloat16, saves it
in HF format, then runs through the same Lightning modules and strategy as
``configs/strategy/fsdp2.yaml`` (ModelParallelStrategy, data_parallel_size = devices, bf16-mixed,
gradient checkpointing):

1. ESIScoringModule: one pass over ``--esi-prompts`` harmful prompts, exact top-1% mask;
2. SafetyInterventionModule (SET) with that mask: ``--set-steps`` SparseAdamW steps.

Reported (JSON on stdout and in ``--out``): wall time, throughput (prompts/s, steps/s,
tokens/s) and peak GPU memory (``torch.cuda.max_memory_allocated``) of each phase, mask size.
Smoke test without a GPU: ``--accelerator cpu --size tiny`` (gloo, one process, float32).

    PYTHONPATH=. python scripts/device_fsdp_check.py --out $OUT/device_fsdp_check.json

(``PYTHONPATH=.`` where lit_safety is not installed in the environment, e.g. a bare device machine.)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

SIZES = {"1B": (2048, 18, 5632, 16), "tiny": (64, 2, 172, 4)}  # hidden, layers, intermediate, heads


class _Throughput(L.Callback):
    def __init__(self) -> None:
        self.tokens = 0
        self.start = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.start is None:
            self.start = time.perf_counter()
        self.tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0


def build_random_model(size: str, dtype: torch.dtype, out: Path) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    from lit_safety.models.loading import load_tokenizer

    tokenizer = load_tokenizer("organism-dense-unaligned:tiny")  # builds the tiny family in seconds
    hidden, layers, intermediate, heads = SIZES[size]
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=512, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def trainer(args: argparse.Namespace, callbacks: list, **kwargs) -> L.Trainer:
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
    precision = "bf16-mixed" if args.accelerator == "gpu" else "32-true"
    return L.Trainer(accelerator=args.accelerator, devices=args.devices, strategy=strategy, precision=precision,
                     logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=callbacks, **kwargs)


def peak_gpu_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1B", choices=list(SIZES))
    parser.add_argument("--accelerator", default="gpu", choices=["gpu", "cpu"])
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--esi-prompts", type=int, default=128)
    parser.add_argument("--set-steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from lit_safety.data.datamodules import RefusalDataModule
    from lit_safety.data.esi import HarmfulPromptsDataModule
    from lit_safety.modules.esi import ESIScoringModule
    from lit_safety.modules.intervention import SafetyInterventionModule

    report: dict = {"size": args.size, "accelerator": args.accelerator, "devices": args.devices,
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    dtype = "bfloat16" if args.accelerator == "gpu" else "float32"
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        start = time.perf_counter()
        report["params"] = build_random_model(args.size, getattr(torch, dtype), model_dir)
        report["build_seconds"] = time.perf_counter() - start

        # 1. ESI scoring (gradient accumulation over the harmful prompts + exact top-1%).
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        esi = ESIScoringModule(model=str(model_dir), dtype=dtype, gradient_checkpointing=args.accelerator == "gpu",
                               output_dir=str(Path(tmp) / "esi"), report=False)
        data = HarmfulPromptsDataModule(tokenizer=str(model_dir), num_samples=args.esi_prompts,
                                        batch_size=args.batch_size)
        start = time.perf_counter()
        trainer(args, [], max_epochs=1).fit(esi, datamodule=data)
        seconds = time.perf_counter() - start
        report["esi"] = {"seconds": seconds, "prompts_per_s": args.esi_prompts / seconds,
                         "peak_gpu_gib": peak_gpu_gib(), "mask_k": esi.mask.k, "mask_n": esi.mask.n}

        # 2. SET with that mask (SparseAdamW on the FSDP2 shards).
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        set_module = SafetyInterventionModule(model=str(model_dir), dtype=dtype,  # SET is the default intervention
                                              mask_path=str(Path(tmp) / "esi" / "mask.safetensors"),
                                              learning_rate=1e-3, gradient_checkpointing=args.accelerator == "gpu",
                                              output_dir=str(Path(tmp) / "set"), save_model=False)
        refusal = RefusalDataModule(tokenizer=str(model_dir), num_samples=args.set_steps * args.batch_size,
                                    batch_size=args.batch_size, max_length=256, val_fraction=0.0)
        meter = _Throughput()
        start = time.perf_counter()
        trainer(args, [meter], max_steps=args.set_steps, limit_val_batches=0).fit(set_module, datamodule=refusal)
        seconds = time.perf_counter() - start
        train_seconds = time.perf_counter() - meter.start if meter.start else seconds
        report["set"] = {"seconds": seconds, "steps": args.set_steps, "steps_per_s": args.set_steps / train_seconds,
                         "tokens_per_s": meter.tokens / train_seconds, "peak_gpu_gib": peak_gpu_gib(),
                         "optimizer_state_elements": set_module.trainer.optimizers[0].state_numel()}
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
