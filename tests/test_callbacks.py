"""SafetyPreservingCallback inside LightningModules that know nothing about lit-safety."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch

from lit_safety.callbacks import SafetyPreservingCallback
from lit_safety.esi.mask import MaskMismatchError, SafetyMask


class Regressor(L.LightningModule):
    """A user's own module: a plain MLP trained with AdamW and weight decay."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.05, weight_decay=0.5)


class HFWrapper(L.LightningModule):
    """A user's module wrapping an HF causal LM as ``self.lm``, trained with SGD."""

    def __init__(self):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        self.lm = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24,
                                               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return self.lm(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)


def loader(*tensors):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*tensors), batch_size=8)


def trainer(callback, steps=20):
    return L.Trainer(max_steps=steps, callbacks=[callback], logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)


def test_plain_module_keeps_masked_entries(tmp_path):
    torch.manual_seed(0)
    module = Regressor()
    mask = SafetyMask(indices={"net.0.weight": torch.tensor([0, 5, 17, 100]), "net.2.weight": torch.arange(16)},
                      shapes={"net.0.weight": (16, 8), "net.2.weight": (1, 16)}, metadata={"model": "regressor"})
    mask.save(tmp_path / "mask.safetensors")
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    x = torch.randn(64, 8)
    trainer(SafetyPreservingCallback(tmp_path / "mask.safetensors")).fit(module, loader(x, x.sum(1, keepdim=True)))
    w0 = module.net[0].weight.detach().reshape(-1)
    assert torch.equal(w0[mask.indices["net.0.weight"]], before["net.0.weight"].reshape(-1)[mask.indices["net.0.weight"]])
    assert torch.equal(module.net[2].weight, before["net.2.weight"])  # fully masked tensor
    assert not torch.equal(module.net[0].weight, before["net.0.weight"])  # the rest trained
    assert not torch.equal(module.net[0].bias, before["net.0.bias"])


def test_bf16_foreign_module_gets_a_master_weights_warning(tmp_path):
    torch.manual_seed(0)
    module = Regressor().to(torch.bfloat16)
    mask = SafetyMask(indices={"net.0.weight": torch.tensor([0, 5])}, shapes={"net.0.weight": (16, 8)})
    x = torch.randn(16, 8, dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match=r"Regressor's training would update 4 bfloat16 parameter tensor\(s\) "
                                         r"\(e.g. 'net.0.weight'\) in place, without float32 master values"):
        trainer(SafetyPreservingCallback(mask), steps=1).fit(module, loader(x, x.sum(1, keepdim=True)))
    float_module = Regressor()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*float32 master values")
        trainer(SafetyPreservingCallback(mask), steps=1).fit(float_module, loader(x.float(), x.float().sum(1, keepdim=True)))


def test_hf_model_wrapped_in_user_module():
    from lit_safety.esi.api import compute_safety_mask

    module = HFWrapper()
    mask = compute_safety_mask(module.lm, method="magnitude", ratio=0.05, progress=False)
    before = {n: p.detach().clone() for n, p in module.lm.named_parameters()}
    ids = torch.randint(0, 50, (32, 12))
    trainer(SafetyPreservingCallback(mask)).fit(module, loader(ids))
    moved = 0
    for name, idx in mask.indices.items():
        now = dict(module.lm.named_parameters())[name].detach().reshape(-1)
        assert torch.equal(now[idx], before[name].reshape(-1)[idx]), name
        moved += int((now != before[name].reshape(-1)).sum())
    assert moved > 0


def test_mask_for_another_model_is_named():
    mask = SafetyMask(indices={"encoder.w": torch.tensor([0])}, shapes={"encoder.w": (2, 2)})
    with pytest.raises(MaskMismatchError, match="encoder.w"):
        trainer(SafetyPreservingCallback(mask), steps=1).fit(Regressor(), loader(torch.randn(8, 8), torch.randn(8, 1)))


# -- SafetyEvalCallback progress -------------------------------------------------------------------------
def _fit_with_eval_callback(tmp_path, progress):
    from lit_safety.callbacks import SafetyEvalCallback
    from lit_safety.data.datamodules import RefusalDataModule
    from lit_safety.evaluation.suite import SuiteConfig
    from lit_safety.modules.base import CausalLMModule

    name = "organism-dense-aligned:tiny"
    module = CausalLMModule(model=name, learning_rate=1e-3)
    data = RefusalDataModule(tokenizer=name, num_samples=16, batch_size=8, val_fraction=0.0)
    callback = SafetyEvalCallback(data=SuiteConfig(num_harmful=8, num_benign=4, task_data=None), max_new_tokens=4,
                                  batch_size=3, output_dir=str(tmp_path / "eval"), plots=False, progress=progress)
    trainer = L.Trainer(max_steps=1, callbacks=[callback], logger=False, enable_checkpointing=False,
                        enable_progress_bar=True, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    return callback


def test_eval_callback_shows_a_bar_per_set_and_stage(tmp_path, tiny_dense_aligned, capsys):
    import re

    callback = _fit_with_eval_callback(tmp_path / "on", progress=True)
    assert [s["stage"] for s in callback.stages] == ["before", "after"]
    err = capsys.readouterr().err
    for stage in ("before", "after"):
        # Shown as soon as the set starts (0/N), then complete: totals count prompts, not batches.
        assert f"eval harmful ({stage}):   0%|          | 0/8" in err
        assert re.search(rf"eval harmful \({stage}\): 100%\|[^\n\r]*\| 8/8 ", err), err[-2000:]
        assert re.search(rf"eval benign \({stage}\): 100%\|[^\n\r]*\| 4/4 ", err), err[-2000:]
    assert "eval task" not in err  # no task set in this evaluation
    assert err.index("eval harmful (before)") < err.index("eval benign (before)") < err.index("eval harmful (after)")

    callback = _fit_with_eval_callback(tmp_path / "off", progress=False)
    assert [s["stage"] for s in callback.stages] == ["before", "after"]
    assert "eval harmful" not in capsys.readouterr().err
