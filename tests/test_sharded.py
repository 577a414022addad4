"""Strategies swapped by config: DDP and FSDP2 (2 CPU processes, gloo) give the single-process mask
and weights; FSDP2 really shards; frozen entries stay bit-identical; the export loads in plain
transformers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from conftest import free_port

from lit_safety.esi.mask import SafetyMask

REPO = Path(__file__).resolve().parents[1]
CPU_FSDP2 = ["--config", "configs/strategy/fsdp2.yaml", "--trainer.accelerator", "cpu",
             "--trainer.precision", "32-true", "--model.gradient_checkpointing", "false"]
CPU_DDP = ["--config", "configs/strategy/ddp.yaml", "--trainer.accelerator", "cpu", "--trainer.precision", "32-true"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "lit_safety.cli", *args], cwd=REPO, capture_output=True, text=True,
                            timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _masks_equal(a: SafetyMask, b: SafetyMask) -> bool:
    return set(a.indices) == set(b.indices) and all(torch.equal(a.indices[n], b.indices[n]) for n in a.indices)


# -- FSDP2 shards ----------------------------------------------------------------------------------

def _shard_worker(rank: int, world: int, port: int, out: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from lit_safety.models.loading import load_model
    from lit_safety.parallel import local_shard, shard_model

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = load_model("organism-dense-aligned:tiny")
        full = {n: p.numel() for n, p in model.named_parameters()}
        mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
        shard_model(model, mesh)
        local = {n: local_shard(p)[0].numel() for n, p in model.named_parameters()}
        kinds = {type(p.data).__name__ for p in model.parameters()}
        tp_mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("data_parallel", "tensor_parallel"))
        try:
            shard_model(load_model("organism-dense-aligned:tiny"), tp_mesh)
            tp_error = ""
        except ValueError as err:
            tp_error = str(err)
        out[rank] = {"full": full, "local": local, "kinds": kinds, "tp_error": tp_error}
    finally:
        dist.destroy_process_group()


def test_fsdp2_really_shards_every_parameter(tiny_dense_aligned):
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_shard_worker, args=(2, free_port(), out), nprocs=2, join=True)
        results = dict(out)
    assert results[0]["kinds"] == {"DTensor"}
    for name, numel in results[0]["full"].items():
        assert results[0]["local"][name] + results[1]["local"][name] == numel, name  # shards tile the tensor
        assert results[0]["local"][name] < numel, name  # nothing left replicated
    assert "data_parallel_size" in results[0]["tp_error"]


# -- ESI ---------------------------------------------------------------------------------------------
def test_esi_mask_is_the_same_single_ddp_and_fsdp2(tmp_path, tiny_dense_aligned):
    # 25 prompts on 2 ranks: rank 1 gets a padding copy (weight 0), which a DistributedSampler would
    # count a second time in S.
    common = ["fit", "--config", "configs/esi.yaml", "--model.model", "organism-dense-aligned:tiny",
              "--data.num_samples", "25", "--data.batch_size", "4", "--trainer.enable_progress_bar", "false",
              "--model.report", "false", "--trainer.default_root_dir", str(tmp_path / "logs")]
    run_cli(*common, "--model.output_dir", str(tmp_path / "single"))
    run_cli(*common, *CPU_DDP, "--model.output_dir", str(tmp_path / "ddp"))
    run_cli(*common, *CPU_FSDP2, "--model.output_dir", str(tmp_path / "fsdp2"))
    single = SafetyMask.load(tmp_path / "single" / "mask.safetensors")
    ddp = SafetyMask.load(tmp_path / "ddp" / "mask.safetensors")
    fsdp2 = SafetyMask.load(tmp_path / "fsdp2" / "mask.safetensors")
    assert single.k == ddp.k == fsdp2.k == round(0.01 * single.n)
    assert _masks_equal(single, ddp)
    assert _masks_equal(single, fsdp2)
    assert fsdp2.metadata["world_size"] == 2 and fsdp2.metadata["sharded"] is True
    assert single.metadata["num_examples"] == ddp.metadata["num_examples"] == fsdp2.metadata["num_examples"] == 25
    assert 0.01 < single.metadata["score_share"] < 1.0
    assert fsdp2.metadata["score_share"] == pytest.approx(single.metadata["score_share"], rel=1e-5)
    for name in single.indices:  # the stored ESI values agree to float tolerance
        torch.testing.assert_close(ddp.scores[name], single.scores[name], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(fsdp2.scores[name], single.scores[name], rtol=1e-5, atol=1e-9)


def test_gradient_free_selection_runs_under_ddp(tmp_path, tiny_dense_aligned):
    """random/magnitude take no gradient, yet DDP needs a parameter that requires grad: the scored
    weights do, and the mask equals the single process's."""
    common = ["fit", "--config", "configs/esi.yaml", "--model.model", "organism-dense-aligned:tiny",
              "--model.selection.method", "magnitude", "--data.num_samples", "4", "--data.batch_size", "2",
              "--trainer.enable_progress_bar", "false", "--model.report", "false",
              "--trainer.default_root_dir", str(tmp_path / "logs")]
    run_cli(*common, "--model.output_dir", str(tmp_path / "single"))
    run_cli(*common, *CPU_DDP, "--model.output_dir", str(tmp_path / "ddp"))
    single = SafetyMask.load(tmp_path / "single" / "mask.safetensors")
    ddp = SafetyMask.load(tmp_path / "ddp" / "mask.safetensors")
    assert single.metadata["method"] == ddp.metadata["method"] == "magnitude" and single.k == round(0.01 * single.n)
    assert _masks_equal(single, ddp)


# -- SET / SPA -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["set", "spa"])
def test_set_and_spa_under_fsdp2_match_single_process(tmp_path, method, tiny_dense_aligned):
    from transformers import AutoModelForCausalLM

    from lit_safety.models.loading import load_model

    config = "configs/set.yaml" if method == "set" else "configs/spa.yaml"
    model_name = "organism-dense-unaligned:tiny" if method == "set" else "organism-dense-aligned:tiny"
    # Every rank reads the same batches (no distributed sampler), so the averaged gradient equals
    # the single process's and the runs must agree.
    common = ["fit", "--config", config, "--model.model", model_name, "--model.esi_num_samples", "16",
              "--data.num_samples", "64", "--data.batch_size", "4", "--trainer.max_steps", "4",
              "--trainer.enable_progress_bar", "false", "--trainer.use_distributed_sampler", "false",
              "--trainer.callbacks=[]", "--model.weight_decay", "0.01", "--trainer.default_root_dir", str(tmp_path / "logs")]
    run_cli(*common, "--model.output_dir", str(tmp_path / "single"))
    run_cli(*common, *CPU_FSDP2, "--model.output_dir", str(tmp_path / "fsdp2"))

    mask = SafetyMask.load(tmp_path / "fsdp2" / "mask.safetensors")
    assert _masks_equal(mask, SafetyMask.load(tmp_path / "single" / "mask.safetensors"))
    single = load_file(tmp_path / "single" / "model" / "model.safetensors")
    sharded = load_file(tmp_path / "fsdp2" / "model" / "model.safetensors")
    assert single.keys() == sharded.keys()
    for key in single:
        torch.testing.assert_close(sharded[key], single[key], rtol=1e-5, atol=1e-6)
    original = dict(load_model(model_name).named_parameters())
    moved = 0
    for name, idx in mask.indices.items():
        before, after = original[name].detach().reshape(-1), sharded[name].reshape(-1)
        selected = torch.zeros_like(before, dtype=torch.bool)
        selected[idx] = True
        if method == "spa":  # frozen entries bit-identical despite weight decay
            assert torch.equal(after[selected], before[selected]), name
        else:  # SET: only the selected entries move
            assert torch.equal(after[~selected], before[~selected]), name
            moved += int((after[selected] != before[selected]).sum())
    if method == "set":
        assert moved > 0
    # The export is a plain HF model.
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp2" / "model")
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    for name, p in reloaded.named_parameters():
        assert torch.equal(p.detach(), sharded[name]), name


def test_unsupported_combinations_fail_clearly(tmp_path, tiny_dense_aligned):
    from lit_safety.models.loading import quantization_config

    with pytest.raises(ValueError, match="quantization must be one of"):
        quantization_config("3bit")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA GPU"):
            quantization_config("4bit")
    result = subprocess.run(
        [sys.executable, "-m", "lit_safety.cli", "fit", "--config", "configs/spa.yaml", *CPU_FSDP2,
         "--model.model", "organism-dense-aligned:tiny", "--model.optimizer", "adamw8bit", "--model.esi_num_samples",
         "8", "--data.num_samples", "16", "--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false",
         "--model.output_dir", str(tmp_path / "out"), "--trainer.default_root_dir", str(tmp_path / "logs")],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert "adamw8bit (bitsandbytes) does not support FSDP2" in result.stderr
