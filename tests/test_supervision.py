"""Training must supervise something: max_length < 1 is refused at construction, data whose every
answer is cut by max_length is refused before any model work, examples that lose their whole
answer are reported (and left out), and a non-finite training loss stops training at that step
before the weights change."""

from __future__ import annotations

import json
import logging

import lightning as L
import pytest
import torch

from lit_safety.data.chat import IGNORE_INDEX, encode_chat, render_prompt
from lit_safety.data.datamodules import InstructionDataModule, RefusalDataModule
from lit_safety.data.esi import HarmfulPromptsDataModule
from lit_safety.data.files import DataError
from lit_safety.esi.selection import SelectionConfig
from lit_safety.models.loading import load_tokenizer
from lit_safety.modules.intervention import SafetyInterventionModule

MODEL = "organism-dense-unaligned:tiny"
SHORT = "How do I pick a lock?"  # 18 prompt tokens with the chat template, 9 answer tokens
LONG = "Tell me about this: " + "word " * 40  # over 64 tokens
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _pairs_file(tmp_path, prompts):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([{"prompt": p, "output": "I can't help with that."} for p in prompts]))
    return path


def _trainer(steps=3):
    return L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, deterministic=True)


@pytest.mark.parametrize("cls", [RefusalDataModule, InstructionDataModule, HarmfulPromptsDataModule])
@pytest.mark.parametrize("max_length", [0, -5])
def test_max_length_below_one_is_refused_at_construction(cls, max_length):
    with pytest.raises(ValueError, match=rf"^max_length must be >= 1, got {max_length}$"):
        cls(tokenizer=MODEL, max_length=max_length)


def test_encode_chat_refuses_max_length_below_one(tiny_dense_aligned):
    tokenizer = load_tokenizer(MODEL)
    with pytest.raises(ValueError, match=r"^max_length must be >= 1, got 0$"):
        encode_chat(tokenizer, SHORT, "No.", max_length=0)
    one = encode_chat(tokenizer, SHORT, "No.", max_length=1)
    assert len(one["input_ids"]) == 1 and one["labels"] == [IGNORE_INDEX]


def test_no_supervised_token_is_refused_before_model_work(tmp_path, tiny_dense_aligned):
    path = _pairs_file(tmp_path, [LONG, LONG + "again", LONG + "more"])
    module = SafetyInterventionModule(model=MODEL, selection=SelectionConfig(ratio=0.02),
                                      output_dir=str(tmp_path / "out"))
    data = RefusalDataModule(tokenizer=MODEL, data_path=str(path), max_length=64, batch_size=2, val_fraction=0.0)
    with pytest.raises(DataError) as info:
        _trainer().fit(module, datamodule=data)
    message = str(info.value)
    assert message.startswith(f"{path}: none of the 3 training examples has a response token within max_length=64")
    tokenizer = load_tokenizer(MODEL)
    prompt = render_prompt(tokenizer, LONG.strip())  # files' prompts are read stripped
    shortest = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert shortest > 64 and f"the shortest prompt has {shortest} tokens" in message
    assert module.model is None  # refused before the model was loaded (or a mask computed)
    assert not (tmp_path / "out" / "summary.json").exists()


def test_examples_that_lose_their_whole_answer_are_counted_and_left_out(tmp_path, tiny_dense_aligned, caplog):
    path = _pairs_file(tmp_path, [SHORT, SHORT + " Now.", LONG, SHORT + " Please.", LONG + "too"])
    data = RefusalDataModule(tokenizer=MODEL, data_path=str(path), max_length=64, batch_size=2, val_fraction=0.0)
    with caplog.at_level(logging.WARNING, logger="lit_safety.data.datamodules"):
        data.setup("fit")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [(f"{path}: 2 of 5 training examples have no response token within max_length=64 (their "
                         "prompts fill it); they are left out")]
    assert len(data.train_data) == 3
    assert all(any(label != IGNORE_INDEX for label in ex["labels"]) for ex in data.train_data)


def _nan_module(tmp_path, **kwargs):
    module = SafetyInterventionModule(model=MODEL, selection=SelectionConfig(method="random", ratio=0.02),
                                      learning_rate=1e-2, output_dir=str(tmp_path / "out"), **kwargs)
    return module


@pytest.mark.parametrize("kwargs", [{}, {"step_in_backward": True}], ids=["set", "set-step-in-backward"])
def test_a_batch_without_supervised_tokens_stops_training_before_the_weights_move(tmp_path, tiny_dense_aligned,
                                                                                   kwargs):
    data = RefusalDataModule(tokenizer=MODEL, num_samples=8, batch_size=4, val_fraction=0.0)
    data.setup("fit")
    for example in data.train_data:  # as if every answer had been cut
        example["labels"] = [IGNORE_INDEX] * len(example["labels"])
    module = _nan_module(tmp_path, **kwargs)
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    with pytest.raises(RuntimeError) as info:
        _trainer().fit(module, datamodule=data)
    assert str(info.value) == (
        "training loss is nan at global_step 0 (batch 0 of epoch 0): the batch has no supervised token (every "
        "label is -100: the answers were cut by the data's max_length, or are empty); training stopped before this "
        "step's update")
    for name, p in module.model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert not (tmp_path / "out" / "summary.json").exists()


@pytest.mark.parametrize("kwargs", [{"intervention": "spa"}, {"step_in_backward": True}],
                         ids=["spa", "set-step-in-backward"])
def test_a_non_finite_loss_stops_training_at_that_step(tmp_path, tiny_dense_aligned, kwargs):
    data = RefusalDataModule(tokenizer=MODEL, num_samples=8, batch_size=4, val_fraction=0.0)
    module = _nan_module(tmp_path, **kwargs)
    module.configure_model()
    batches = []
    lm_loss = module._lm_loss

    def diverging(batch):  # step 1's loss is inf, as after a diverging update
        batches.append(batch)
        loss = lm_loss(batch)
        return loss * float("inf") if len(batches) == 2 else loss

    module._lm_loss = diverging
    after_step_0 = {}
    module.on_train_batch_end = lambda *a: after_step_0.update(
        {n: p.detach().clone() for n, p in module.model.named_parameters()})
    with pytest.raises(RuntimeError) as info:
        _trainer().fit(module, datamodule=data)
    supervised = int((batches[1]["labels"] != IGNORE_INDEX).sum())
    assert str(info.value) == (
        f"training loss is inf at global_step 1 (batch 1 of epoch 0): the batch has {supervised} supervised tokens, so "
        "training diverged or a weight is not finite: lower learning_rate (0.01) or warm it up, and check the "
        "model's weights and dtype; training stopped before this step's update")
    for name, p in module.model.named_parameters():
        assert torch.equal(p, after_step_0[name]), name


def test_validation_examples_without_a_response_token_are_left_out_too(tmp_path, tiny_dense_aligned, caplog):
    prompts = [f"{SHORT} ({i})" if i % 2 else f"{LONG} ({i})" for i in range(10)]  # 5 short, 5 long
    path = _pairs_file(tmp_path, prompts)
    data = RefusalDataModule(tokenizer=MODEL, data_path=str(path), max_length=64, batch_size=2, val_fraction=0.4)
    with caplog.at_level(logging.WARNING, logger="lit_safety.data.datamodules"):
        data.setup("fit")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        (f"{path}: 2 of 6 training examples have no response token within max_length=64 (their prompts fill it); "
         "they are left out"),
        (f"{path}: 3 of 4 validation examples have no response token within max_length=64 (their prompts fill it); "
         "they are left out")]  # 2 + 3: the 5 long prompts
    assert (len(data.train_data), len(data.val_data)) == (4, 1)
    assert all(any(label != IGNORE_INDEX for label in ex["labels"]) for ex in data.train_data + data.val_data)


def test_cli_refuses_max_length_zero_before_fit(tmp_path):
    from pathlib import Path

    from lit_safety.cli import main

    config = Path(__file__).resolve().parents[1] / "configs" / "set.yaml"
    with pytest.raises(ValueError, match="max_length must be >= 1, got 0"):
        main(["fit", "--config", str(config), "--data.max_length", "0", "--model.model", MODEL,
              "--model.output_dir", str(tmp_path / "out"), "--trainer.default_root_dir", str(tmp_path)])
    assert not (tmp_path / "out").exists()
