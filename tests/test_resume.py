"""Mid-epoch resume is exact: a run resumed from a checkpoint taken in the middle of an epoch
sees the batches an uninterrupted run would (the training loader's position is in the
checkpoint), so every weight is bit-identical at every later step."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_safety.data import datamodules
from lit_safety.data.datamodules import EpochSeededSampler, RefusalDataModule
from lit_safety.esi.selection import SelectionConfig
from lit_safety.modules.intervention import SafetyInterventionModule

MODEL = "organism-dense-unaligned:tiny"
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


# -- the loader on its own ------------------------------------------------------------------------
def _loader(n=10, batch_size=3, seed=1, **kwargs):
    return datamodules.ResumableDataLoader(list(range(n)), batch_size=batch_size, sampler=EpochSeededSampler(n, seed),
                                           **kwargs)


def _epoch(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return [b.tolist() for b in loader]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_loader_resumes_after_the_batches_it_yielded(num_workers):
    full = _epoch(_loader(), 2)
    loader = _loader(num_workers=num_workers)
    loader.sampler.set_epoch(2)
    it = iter(loader)
    assert [next(it).tolist(), next(it).tolist()] == full[:2]
    state = loader.state_dict()
    assert state == {"epoch": 2, "batches": 2}
    fresh = _loader(num_workers=num_workers)
    fresh.load_state_dict(state)
    assert len(fresh) == 4  # Lightning's num_training_batches stays the whole epoch
    assert _epoch(fresh, 2) == full[2:]
    assert _epoch(fresh, 3) == _epoch(_loader(), 3)  # only the first pass is shortened


@pytest.mark.parametrize("num_workers", [0, 1])
def test_loader_asks_the_sampler_for_its_order_at_the_first_batch(num_workers):
    """Lightning calls iter() before set_epoch (and does not call it again on resume)."""
    loader = _loader(num_workers=num_workers)
    it = iter(loader)
    loader.sampler.set_epoch(3)
    assert [b.tolist() for b in it] == _epoch(_loader(), 3)


def test_loader_state_of_another_epoch_or_a_finished_pass_skips_nothing():
    loader = _loader()
    loader.load_state_dict({"epoch": 0, "batches": 2})
    assert _epoch(loader, 1) == _epoch(_loader(), 1)  # saved in epoch 0, resumed into epoch 1
    loader.load_state_dict({"epoch": 1, "batches": 4})  # checkpoint after the last batch
    assert _epoch(loader, 1) == _epoch(_loader(), 1)


@pytest.mark.parametrize("state, message", [
    ({"batches": 2}, "'epoch'"),
    ({"epoch": 0, "batches": -1}, "batches"),
    ({"epoch": 0, "batches": 5}, "batches"),
])
def test_loader_rejects_a_bad_state(state, message):
    with pytest.raises(ValueError, match=message):
        _loader().load_state_dict(state)


@pytest.mark.parametrize("rank", [0, 1])
def test_loader_resumes_under_ddp_sampler_replacement(rank):
    """Under DDP Lightning re-creates the loader around a DistributedSamplerWrapper; the copy is
    still resumable, and leaves out this rank's batches of its shard."""
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
    from lightning.pytorch.utilities.data import _update_dataloader

    def ddp_loader():
        with _replace_dunder_methods(torch.utils.data.DataLoader, "dataset"):
            loader = _loader(n=22, batch_size=3)
        return _update_dataloader(loader, wrapper(loader.sampler))

    def wrapper(sampler):  # as Lightning makes it for a training loader
        return DistributedSamplerWrapper(sampler, num_replicas=2, rank=rank, shuffle=True, seed=0)

    full = _epoch(ddp_loader(), 1)
    shard = wrapper(EpochSeededSampler(22, seed=1))
    shard.set_epoch(1)
    assert [i for batch in full for i in batch] == list(shard)  # this rank's share of epoch 1
    loader = ddp_loader()
    assert isinstance(loader, datamodules.ResumableDataLoader)
    loader.load_state_dict({"epoch": 1, "batches": 3})
    assert _epoch(loader, 1) == full[3:]


def test_data_modules_train_loaders_are_resumable():
    from lightning.fabric.utilities.types import _Stateful

    data = RefusalDataModule(tokenizer=MODEL, num_samples=16, batch_size=4, val_fraction=0.25)
    data.setup("fit")
    assert isinstance(data.train_dataloader(), _Stateful)


# -- a whole fit ----------------------------------------------------------------------------------
def _fit(tmp_path, name, steps, ckpt=None, **module_kwargs):
    """SET on 16 pairs in batches of 4 (4 batches an epoch), a checkpoint every 3 steps."""
    L.seed_everything(0)
    module = SafetyInterventionModule(model=MODEL, selection=SelectionConfig(ratio=0.02), learning_rate=1e-2,
                                      output_dir=str(tmp_path / f"{name}-out"), save_model=False, **module_kwargs)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / name, every_n_train_steps=3, save_top_k=-1,
                                  filename="{step}")
    trainer = L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, deterministic=True, callbacks=[checkpoints], num_sanity_val_steps=0)
    data = RefusalDataModule(tokenizer=MODEL, num_samples=16, batch_size=4, val_fraction=0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=data, ckpt_path=ckpt)
    return module, trainer, [str(w.message) for w in caught]


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.parametrize("module_kwargs", [
    {"intervention": "set", "warmup_steps": 5},
    {"intervention": "set", "step_in_backward": True},
    {"intervention": "spa", "weight_decay": 0.1},
], ids=["set-warmup", "set-step-in-backward", "spa"])
def test_mid_epoch_resume_matches_uninterrupted(tmp_path, module_kwargs):
    straight, _, _ = _fit(tmp_path, "straight", 10, **module_kwargs)
    # resume at step 3: batch 3 of 4 in epoch 0; then through epochs 1 and 2 (steps 4-7, 8-10)
    resumed, trainer, messages = _fit(tmp_path, "resumed", 10, ckpt=str(tmp_path / "straight" / "step=3.ckpt"),
                                      **module_kwargs)
    assert trainer.global_step == 10
    for step in (6, 9):  # mid-epoch 1, mid-epoch 2: every saved tensor bit-identical
        a = _weights(tmp_path / "straight" / f"step={step}.ckpt")
        b = _weights(tmp_path / "resumed" / f"step={step}.ckpt")
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), (step, name)
    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b), name
    opt_a = torch.load(tmp_path / "straight" / "step=9.ckpt", weights_only=True)["optimizer_states"][0]["state"]
    opt_b = torch.load(tmp_path / "resumed" / "step=9.ckpt", weights_only=True)["optimizer_states"][0]["state"]
    assert opt_a.keys() == opt_b.keys() and opt_a
    for key in opt_a:
        for field in opt_a[key]:
            assert torch.equal(torch.as_tensor(opt_a[key][field]), torch.as_tensor(opt_b[key][field])), (key, field)
    assert not [m for m in messages if "not resumable" in m], messages


def test_resuming_mid_epoch_from_a_checkpoint_without_the_loader_position_warns(tmp_path):
    _fit(tmp_path, "straight", 3)
    old = torch.load(tmp_path / "straight" / "step=3.ckpt", weights_only=True)
    assert old["loops"]["fit_loop"]["state_dict"].pop("combined_loader") == [{"epoch": 0, "batches": 3}]
    torch.save(old, tmp_path / "old.ckpt")  # as written before the loaders were resumable
    _, trainer, messages = _fit(tmp_path, "resumed", 4, ckpt=str(tmp_path / "old.ckpt"))
    assert trainer.global_step == 4
    assert [m for m in messages if "loader's position" in m] == [(
        f"checkpoint {tmp_path / 'old.ckpt'} was saved after 3 batches of an epoch without the training data loader's "
        "position: this run trains on that epoch's batches from the first one again, so it does not match an "
        "uninterrupted run (checkpoints written now store the position)")]
    _, _, messages = _fit(tmp_path, "again", 4, ckpt=str(tmp_path / "straight" / "step=3.ckpt"))
    assert not [m for m in messages if "loader's position" in m or "not resumable" in m]
