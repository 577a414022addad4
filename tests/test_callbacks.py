"""SafetyPreservingCallback inside LightningModules that know nothing about lit-safety."""

from __future__ import annotations

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
