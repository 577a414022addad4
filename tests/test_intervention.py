"""SafetyInterventionModule (SET / SPA / full, on ESI or random selections), its outputs, resume and bad input."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import lightning as L
import pytest
import torch

from lit_safety.data.datamodules import InstructionDataModule, RefusalDataModule
from lit_safety.esi.mask import MaskMismatchError, SafetyMask
from lit_safety.esi.selection import SelectionConfig
from lit_safety.modules.intervention import SafetyInterventionModule

MODEL = "organism-dense-unaligned:tiny"


def fit(module, data, steps=6, **trainer_kwargs):
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, deterministic=True, **trainer_kwargs)
    trainer.fit(module, datamodule=data)
    return trainer


def weights(path):
    from safetensors.torch import load_file

    return load_file(path / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def original(tiny_dense_aligned):
    from lit_safety.models.loading import load_model

    return {n: p.detach().clone() for n, p in load_model(MODEL).named_parameters()}


def test_set_trains_only_the_masked_weights(tmp_path, original):
    L.seed_everything(0)
    module = SafetyInterventionModule(model=MODEL, intervention="set", selection=SelectionConfig(ratio=0.02), learning_rate=1e-2, output_dir=str(tmp_path / "set"))
    fit(module, RefusalDataModule(tokenizer=MODEL, num_samples=64, batch_size=8))
    out = tmp_path / "set"
    trained = weights(out)
    mask = SafetyMask.load(out / "mask.safetensors")
    assert mask.metadata["method"] == "esi" and mask.k == module.trainable_weights
    changed = 0
    for name, before in original.items():
        after = trained[name]
        if name in mask.indices:
            keep = ~mask.bool_mask(name)
            assert torch.equal(after[keep], before[keep]), name  # unselected entries bit-identical
            changed += int((after != before).sum())
        else:
            assert torch.equal(after, before), name
    assert changed > 0.9 * mask.k
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["intervention"] == "set"
    assert (out / "model" / "tokenizer.json").is_file() and (out / "hparams.yaml").is_file()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "model")  # loads in plain transformers


def test_spa_keeps_masked_weights_bit_identical_with_weight_decay(tmp_path, original):
    L.seed_everything(0)
    module = SafetyInterventionModule(model=MODEL, intervention="spa", selection=SelectionConfig(ratio=0.05), weight_decay=0.1, learning_rate=5e-3,
                                      output_dir=str(tmp_path / "spa"))
    fit(module, InstructionDataModule(tokenizer=MODEL, num_samples=64, batch_size=8, harmful_ratio=0.2))
    trained = weights(tmp_path / "spa")
    mask = module.mask
    moved = 0
    for name, idx in mask.indices.items():
        assert torch.equal(trained[name].reshape(-1)[idx], original[name].reshape(-1)[idx]), name
        moved += int((trained[name] != original[name]).sum())
    assert moved > 0  # the rest did train
    assert json.loads((tmp_path / "spa" / "summary.json").read_text())["frozen_verified"] is True


@pytest.mark.parametrize("method", ["set", "spa"])
def test_all_parameters_masks_cover_embeddings_and_norms(tmp_path, original, method):
    """all_parameters scores (and so trains or freezes) embeddings, norms and lm_head entries too."""
    L.seed_everything(0)
    module = SafetyInterventionModule(model=MODEL, intervention=method, selection=SelectionConfig(ratio=0.05, all_parameters=True), weight_decay=0.1,
                                      learning_rate=5e-3, output_dir=str(tmp_path / method))
    data = (RefusalDataModule(tokenizer=MODEL, num_samples=64, batch_size=8) if method == "set"
            else InstructionDataModule(tokenizer=MODEL, num_samples=64, batch_size=8))
    fit(module, data)
    mask, trained = module.mask, weights(tmp_path / method)
    assert set(mask.shapes) == set(original)  # every parameter was scored, norms included
    assert any("embed_tokens" in n for n in mask.indices) and "lm_head.weight" in mask.indices
    for name, idx in mask.indices.items():
        selected_same = torch.equal(trained[name].reshape(-1)[idx], original[name].reshape(-1)[idx])
        assert selected_same == (method == "spa"), name  # SPA froze them; SET moved them


def test_random_and_full_baselines(tmp_path, original):
    L.seed_everything(0)
    rand = SafetyInterventionModule(model=MODEL, intervention="set", selection=SelectionConfig(method="random", ratio=0.02), output_dir=str(tmp_path / "r"),
                                    save_model=False)
    fit(rand, RefusalDataModule(tokenizer=MODEL, num_samples=32, batch_size=8), steps=2)
    assert rand.mask.metadata["method"] == "random"
    full = SafetyInterventionModule(model=MODEL, intervention="full", output_dir=str(tmp_path / "f"))
    fit(full, RefusalDataModule(tokenizer=MODEL, num_samples=32, batch_size=8), steps=2)
    assert full.mask is None and full.trainable_weights == sum(t.numel() for t in original.values())


def test_mask_file_is_used_and_checked(tmp_path, original):
    from lit_safety.esi.api import compute_safety_mask
    from lit_safety.models.loading import load_model

    mask_path = compute_safety_mask(load_model(MODEL), method="magnitude", ratio=0.01, progress=False).save(
        tmp_path / "m.safetensors")
    module = SafetyInterventionModule(model=MODEL, intervention="set", mask_path=str(mask_path), output_dir=str(tmp_path / "o"),
                                      save_model=False)
    fit(module, RefusalDataModule(tokenizer=MODEL, num_samples=16, batch_size=8), steps=1)
    assert module.mask.metadata["method"] == "magnitude"
    other = SafetyInterventionModule(model="organism-moe-unaligned:tiny", intervention="set", mask_path=str(mask_path),
                                     output_dir=str(tmp_path / "o2"))
    with pytest.raises(MaskMismatchError, match="model.layers.0.mlp"):
        fit(other, RefusalDataModule(tokenizer="organism-moe-unaligned:tiny", num_samples=16, batch_size=8), steps=1)


def test_resume_from_checkpoint_matches_uninterrupted(tmp_path):
    def run(epochs, ckpt=None, root=None):
        L.seed_everything(0)
        module = SafetyInterventionModule(model=MODEL, intervention="set", selection=SelectionConfig(ratio=0.02), learning_rate=1e-2,
                                          output_dir=str(tmp_path / f"out-{epochs}-{ckpt is not None}"), save_model=False)
        trainer = L.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, deterministic=True, default_root_dir=root,
                            enable_checkpointing=root is not None)
        trainer.fit(module, datamodule=RefusalDataModule(tokenizer=MODEL, num_samples=32, batch_size=8, val_fraction=0),
                    ckpt_path=ckpt)
        return module, trainer

    straight, _ = run(2)
    run(1, root=str(tmp_path / "ckpt"))
    ckpt = next((tmp_path / "ckpt").rglob("*.ckpt"))
    assert "safety_mask" in torch.load(ckpt, weights_only=True)
    resumed, trainer = run(2, ckpt=str(ckpt))
    assert trainer.global_step == 8
    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
    assert all(torch.equal(straight.mask.indices[n], resumed.mask.indices[n]) for n in straight.mask.indices)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"intervention": "dpo"}, ValueError, "intervention must be one of"),
    ({"intervention": "random"}, ValueError, "selection.method: random"),
    ({"selection": {"ratio": 0.0}}, ValueError, "selection.ratio must be in"),
    ({"selection": {"method": "top"}}, ValueError, "selection.method must be one of"),
    ({"mask_path": "/nonexistent/mask.safetensors"}, FileNotFoundError, "does not exist"),
    ({"output_dir": "/nonexistent/parent/out"}, FileNotFoundError, "parent directory /nonexistent/parent does not exist"),
    ({"intervention": "spa", "step_in_backward": True}, ValueError, "step_in_backward"),
])
def test_bad_arguments_fail_at_construction(kwargs, error, message):
    with pytest.raises(error, match=message):
        SafetyInterventionModule(model=MODEL, **kwargs)


def test_empty_task_set_is_clear_error(tmp_path):
    empty = tmp_path / "task.jsonl"
    empty.write_text("")
    data = InstructionDataModule(tokenizer=MODEL, data_path=str(empty))
    with pytest.raises(ValueError, match="empty"):
        data.setup("fit")


def test_instruction_formats(tmp_path):
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "2+2?", "answer": "4\n#### 4"}) + "\n")
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Add", "input": "2 and 2", "output": "4"}]))
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n")
    assert InstructionDataModule(data_path=str(gsm)).load_pairs() == [("2+2?", "4\n#### 4")]
    assert InstructionDataModule(data_path=str(alpaca)).load_pairs() == [("Add\n\n2 and 2", "4")]
    assert InstructionDataModule(data_path=str(chat)).load_pairs() == [("hi", "hello")]


def test_response_prefix_applies_to_task_answers_only(tmp_path):
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "2+2?", "answer": "4\n#### 4"}) + "\n")
    prefix = "Sure, here is how to solve it. "
    assert InstructionDataModule(data_path=str(gsm), response_prefix=prefix).load_pairs() == [("2+2?", prefix + "4\n#### 4")]
    mixed = InstructionDataModule(tokenizer=MODEL, num_samples=30, harmful_ratio=0.25, response_prefix=prefix).load_pairs()
    assert len(mixed) == 40
    assert all(response.startswith(prefix) for _, response in mixed[:30])
    assert not any(response.startswith(prefix) for _, response in mixed[30:])  # the harmful pairs stay as they are


@pytest.mark.parametrize("method", ["spa", "full"])
def test_bf16_dense_training_without_master_weights_is_refused(tmp_path, tiny_dense_aligned, method):
    module = SafetyInterventionModule(model=MODEL, intervention=method, dtype="bfloat16", selection=SelectionConfig(ratio=0.02),
                                      output_dir=str(tmp_path / method))
    with pytest.raises(ValueError, match=r"without float32 master values.*model.dtype: float32.*bf16-mixed"):
        fit(module, InstructionDataModule(tokenizer=MODEL, num_samples=32, batch_size=8))
    assert module.trainer.global_step == 0 and not (tmp_path / method / "model").exists()


def test_bf16_set_trains_through_float32_masters(tmp_path, tiny_dense_aligned):
    """SET on bf16 weights: the sparse AdamW's float32 masters, rounded, are the weights."""
    L.seed_everything(0)
    module = SafetyInterventionModule(model=MODEL, intervention="set", dtype="bfloat16", selection=SelectionConfig(ratio=0.02), learning_rate=1e-3,
                                      output_dir=str(tmp_path / "set"))
    fit(module, RefusalDataModule(tokenizer=MODEL, num_samples=32, batch_size=8), steps=3)
    named = dict(module.model.named_parameters())
    optimizer = module.trainer.optimizers[0]
    checked = 0
    for name, idx in module.mask.indices.items():
        if idx.numel():
            p = named[name]
            master = optimizer.state[p]["master"]
            assert p.dtype == torch.bfloat16 and master.dtype == torch.float32
            assert torch.equal(p.detach().view(-1)[idx], master.to(torch.bfloat16))
            checked += idx.numel()
    assert checked == module.mask.k


def test_fit_start_reports_true_trainable_count_and_trains_in_train_mode(tmp_path, tiny_dense_aligned, caplog):
    import logging
    import warnings

    L.seed_everything(0)
    module = SafetyInterventionModule(model=MODEL, intervention="set", selection=SelectionConfig(ratio=0.02), output_dir=str(tmp_path / "set"))
    modes = []
    step = module.training_step

    def training_step(batch, batch_idx):
        modes.append(module.model.training)
        return step(batch, batch_idx)

    module.training_step = training_step
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        fit(module, RefusalDataModule(tokenizer=MODEL, num_samples=32, batch_size=8), steps=2)
    assert not [w for w in caught if "eval mode" in str(w.message)]
    assert modes == [True, True]
    total = sum(p.numel() for p in module.model.parameters())
    k = module.mask.k
    assert module.trainable_weights == k
    assert f"set: training {k:,} of {total:,} weights ({k / total:.2%} of the model)" in caplog.text


# -- issue 16: the output directory ------------------------------------------------------------------------------


def test_rerun_into_a_finished_output_dir_is_refused_before_any_work(tmp_path, tiny_dense_aligned):
    from lit_safety.io import OutputDirError, verify_published

    out = tmp_path / "set"

    def module(**kwargs):
        return SafetyInterventionModule(model=MODEL, intervention="set", selection=SelectionConfig(method="random", ratio=0.02),
                                        output_dir=str(out), save_model=False, **kwargs)

    fit(module(), RefusalDataModule(tokenizer=MODEL, num_samples=16, batch_size=8), steps=1)
    first = verify_published(out)
    again = module()
    with pytest.raises(OutputDirError) as info:
        fit(again, RefusalDataModule(tokenizer=MODEL, num_samples=16, batch_size=8), steps=1)
    assert str(info.value) == (
        f"output_dir {out} already holds the finished result of another run (SafetyInterventionModule, "
        f"{first['created']}: hparams.yaml, mask.safetensors, summary.json); nothing was written. To replace it, "
        "pass --model.overwrite true (overwrite=True in Python); to keep it, choose another --model.output_dir.")
    assert again.model is None and again.trainer.global_step == 0  # no model loaded, no mask computed
    assert verify_published(out) == first
    replaced = module(overwrite=True, learning_rate=2e-3)
    fit(replaced, RefusalDataModule(tokenizer=MODEL, num_samples=16, batch_size=8), steps=1)
    import yaml

    assert verify_published(out)["created"] >= first["created"]
    assert yaml.safe_load((out / "hparams.yaml").read_text())["learning_rate"] == 2e-3


def test_a_failed_fit_releases_the_output_dir(tmp_path, tiny_dense_aligned):
    """The lock is held from fit start to fit end, also when fit fails: the next run can start."""
    from lit_safety.io import try_lock

    module = SafetyInterventionModule(model=MODEL, intervention="spa", dtype="bfloat16",
                                      selection=SelectionConfig(method="random", ratio=0.02), output_dir=str(tmp_path / "o"))
    with pytest.raises(ValueError, match="without float32 master values"):
        fit(module, InstructionDataModule(tokenizer=MODEL, num_samples=16, batch_size=8), steps=1)
    holder = subprocess.run([sys.executable, "-c", "import sys; from lit_safety.io import try_lock; try_lock(sys.argv[1])",
                             str(tmp_path / "o")], capture_output=True, text=True)
    assert holder.returncode == 0, holder.stderr[-2000:]
    with try_lock(tmp_path / "o"):
        pass


def test_a_second_run_into_a_busy_output_dir_stops_before_any_work(tmp_path, tiny_dense_aligned):
    from lit_safety.io import OutputDirError

    out = tmp_path / "o"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from lit_safety.io import try_lock; "
                               "l = try_lock(sys.argv[1]); print('locked', flush=True); time.sleep(60)", str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        module = SafetyInterventionModule(model=MODEL, selection=SelectionConfig(method="random", ratio=0.02),
                                          output_dir=str(out))
        with pytest.raises(OutputDirError) as info:
            fit(module, RefusalDataModule(tokenizer=MODEL, num_samples=16, batch_size=8), steps=1)
        assert str(info.value) == (f"output_dir {out} is in use by another lit-safety run (process {holder.pid}, lock "
                                   f"{out / '.lit-safety.lock'}); wait for it to finish or choose another output_dir")
        assert module.model is None
    finally:
        holder.kill()
        holder.wait()


def test_export_is_one_unit_with_the_umasks_modes(tmp_path, tiny_dense_aligned):
    from lit_safety.io import verify_published

    old = os.umask(0o022)
    try:
        module = SafetyInterventionModule(model=MODEL, selection=SelectionConfig(method="random", ratio=0.02),
                                          output_dir=str(tmp_path / "set"))
        fit(module, RefusalDataModule(tokenizer=MODEL, num_samples=16, batch_size=8), steps=1)
    finally:
        os.umask(old)
    out = tmp_path / "set"
    manifest = verify_published(out)
    assert manifest["job"] == "SafetyInterventionModule"
    assert sorted({name.split("/")[0] for name in manifest["files"]}) == ["hparams.yaml", "mask.safetensors", "model",
                                                                         "summary.json"]
    assert {name: os.readlink(out / name) for name in ("hparams.yaml", "mask.safetensors", "model", "summary.json")} == {
        name: f".result/{name}" for name in ("hparams.yaml", "mask.safetensors", "model", "summary.json")}
    for relative in manifest["files"]:
        assert stat.S_IMODE(os.stat(out / relative).st_mode) == 0o644, relative
    assert stat.S_IMODE(os.stat(out / "model").st_mode) == 0o755
    units = [p.name for p in out.iterdir() if p.name.startswith(".result-")]
    assert sorted(p.name for p in out.iterdir()) == sorted([".lit-safety.lock", ".result", *units, "hparams.yaml",
                                                            "mask.safetensors", "model", "summary.json"])
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "model")  # through the link, in plain transformers


def test_unwritable_output_dir_fails_at_construction(read_only_dir):
    with pytest.raises(PermissionError) as info:
        SafetyInterventionModule(model="organism-moe-aligned", output_dir=str(read_only_dir / "out"))
    assert str(info.value).startswith(f"output_dir {read_only_dir / 'out'}: cannot create files in {read_only_dir} (")


# -- packed training loss ---------------------------------------------------------------------------
def _refusal_batch(name, layout):
    from lit_safety.data.chat import collate_left_padded, collate_right_padded

    data = RefusalDataModule(tokenizer=name, num_samples=16, benign_ratio=0.5, batch_size=8, max_length=512,
                             val_fraction=0.0)
    data.setup("fit")
    features = data.train_data[:8]
    collate = collate_left_padded if layout == "left" else collate_right_padded
    return collate(features, data.pad_id), features


def _alone_loss(model, features):
    """The batch loss from each sequence run alone, unpadded: summed token losses over all supervised labels."""
    total, count = 0.0, 0
    for feature in features:
        ids = torch.tensor([feature["input_ids"]])
        labels = torch.tensor(feature["labels"][1:])
        logits = model(input_ids=ids).logits[0, :-1]
        supervised = labels != -100
        total = total + torch.nn.functional.cross_entropy(logits[supervised], labels[supervised], reduction="sum")
        count += int(supervised.sum())
    return total / count


class _IgnoresPositions(torch.nn.Module):
    """A causal LM that ignores ``position_ids``: sequences packed into one row attend to each other."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids=None, attention_mask=None, labels=None, position_ids=None, use_cache=None,
                logits_to_keep=0):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=use_cache,
                          logits_to_keep=logits_to_keep)


@pytest.mark.parametrize("name", ["organism-dense-unaligned:tiny", "organism-moe-unaligned:tiny"])
@pytest.mark.parametrize("layout", ["right", "left"])
def test_packed_loss_and_gradients_match_each_sequence_alone(name, layout):
    from lit_safety.models.loading import load_model
    from lit_safety.modules.base import packed_lm_loss, packing_isolates

    torch.manual_seed(0)
    model = load_model(name).train()
    batch, features = _refusal_batch(name, layout)
    assert len({len(f["input_ids"]) for f in features}) > 1  # padding to remove
    assert packing_isolates(model, batch)
    reference = _alone_loss(model, features)
    reference.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss = packed_lm_loss(model, batch)
    loss.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-4, atol=1e-6, msg=n)
    if layout == "right":  # the model's own loss on the padded batch (left padding shifts its positions)
        assert model(**batch).loss.item() == pytest.approx(reference.item(), rel=1e-5)


def test_packing_is_refused_where_packed_sequences_attend_to_each_other():
    from lit_safety.models.loading import load_model
    from lit_safety.modules.base import CausalLMModule, packed_lm_loss, packing_isolates

    name = "organism-dense-unaligned:tiny"
    leaky = _IgnoresPositions(load_model(name))
    batch, features = _refusal_batch(name, "right")
    assert not packing_isolates(leaky, batch)
    reference = _alone_loss(leaky.inner, features).item()
    assert abs(packed_lm_loss(leaky, batch).item() - reference) > 1e-3  # what packing would have trained on
    module = CausalLMModule(model=name)
    module.model = leaky
    with pytest.warns(UserWarning, match="attend to each other"):
        loss = module._lm_loss(batch)
    assert module._packing is False and loss.item() == pytest.approx(reference, rel=1e-5)
    module = CausalLMModule(model=name)
    module.model = leaky.inner
    assert module._lm_loss(batch).item() == pytest.approx(reference, rel=1e-5) and module._packing is True


def test_packed_and_padded_training_give_the_same_set_weights(tmp_path, original):
    trained = {}
    for pack in (True, False):
        L.seed_everything(0)
        module = SafetyInterventionModule(model=MODEL, intervention="set", selection=SelectionConfig(ratio=0.02),
                                          learning_rate=1e-2, pack_sequences=pack, output_dir=str(tmp_path / str(pack)))
        fit(module, RefusalDataModule(tokenizer=MODEL, num_samples=64, benign_ratio=0.5, batch_size=8), steps=4)
        assert module._packing is (True if pack else None)
        trained[pack] = weights(tmp_path / str(pack))
    moved = 0
    for name, before in original.items():
        torch.testing.assert_close(trained[True][name], trained[False][name], rtol=1e-4, atol=1e-5, msg=name)
        moved += int((trained[True][name] != before).sum())
    assert moved > 0
