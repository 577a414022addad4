"""ESI on half-precision models is accumulated and scored in float32, on every path; and the judge
objective by name fails clearly without a guard, and works the documented way."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import reference_selection

from lit_safety.data.esi import prompt_batches
from lit_safety.esi.api import compute_safety_mask
from lit_safety.esi.selection import SelectionConfig
from lit_safety.esi.objectives import RefusalObjective, make_objective
from lit_safety.esi.scoring import ParameterFilter, safety_gradient
from lit_safety.organism.corpus import harmful_examples

N_PROMPTS, BATCH_SIZE, RATIO, SEED = 12, 4, 0.05, 3


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny bf16 matmuls: one thread (two threads on a busy machine are many times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    from lit_safety.organism.tokenizer import train_tokenizer

    examples = harmful_examples(N_PROMPTS, seed=SEED)  # what HarmfulPromptsDataModule(num_samples=12, seed=3) reads
    prompts, refusals = [e.prompt for e in examples], [e.refusal for e in examples]
    return prompts, refusals, train_tokenizer(prompts * 10 + refusals * 10, vocab_size=300)


def tiny_bf16_llama(tokenizer, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).to(torch.bfloat16).eval()


def reference_esi(model, tokenizer, prompts, refusals) -> dict[str, torch.Tensor]:
    """Independently: each batch's bf16 gradient from autograd.grad, summed in float32 in batch
    order, divided by N, times the float32 std of the tensor, abs."""
    params = ParameterFilter().select(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(any(p is q for q in params.values()))
    total = {n: torch.zeros(p.shape, dtype=torch.float32) for n, p in params.items()}
    try:
        for batch in prompt_batches(tokenizer, prompts, refusals, objective="refusal", batch_size=BATCH_SIZE):
            values = RefusalObjective()(model, batch)
            grads = torch.autograd.grad(values.sum(), list(params.values()))
            for name, grad in zip(params, grads):
                assert grad.dtype == torch.bfloat16
                total[name] += grad.float()
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    return {n: (total[n] / len(prompts) * p.detach().float().std()).abs() for n, p in params.items()}


def test_bf16_esi_is_float32_and_equals_reference(data):
    prompts, refusals, tokenizer = data
    model = tiny_bf16_llama(tokenizer)
    reference = reference_esi(model, tokenizer, prompts, refusals)
    kwargs = dict(targets=refusals, batch_size=BATCH_SIZE, progress=False)
    mask = compute_safety_mask(model, tokenizer, prompts, ratio=RATIO, **kwargs)
    every = compute_safety_mask(model, tokenizer, prompts, ratio=1.0, **kwargs)  # every score, flat order
    assert all(p.grad is None and safety_gradient(p) is None for p in model.parameters())  # buffers released
    assert every.k == every.n == sum(s.numel() for s in reference.values())
    for name, ref in reference.items():
        assert every.scores[name].dtype == torch.float32
        assert torch.equal(every.indices[name], torch.arange(ref.numel()))
        torch.testing.assert_close(every.scores[name], ref.reshape(-1), rtol=1e-6, atol=1e-12)

    want = reference_selection(reference, mask.k, "global")
    assert sorted(mask.indices) == sorted(want)
    for name, idx in want.items():
        assert torch.equal(mask.indices[name], idx), name
        assert mask.scores[name].dtype == torch.float32
        torch.testing.assert_close(mask.scores[name], reference[name].reshape(-1)[idx], rtol=1e-6, atol=1e-12)

    flat_ref = torch.cat([r.reshape(-1) for r in reference.values()])
    threshold = float(flat_ref.sort(descending=True).values[mask.k - 1])
    assert mask.metadata["threshold"] == pytest.approx(threshold, rel=1e-6)
    ref_ties = int((flat_ref == threshold).sum())
    ties = int(sum((s == mask.metadata["threshold"]).sum() for s in every.scores.values()))
    assert ties == ref_ties  # bf16 accumulation and scores gave far more ties than the float32 reference
    assert ref_ties < 5  # a handful (2 here), not hundreds


def test_bf16_grad_and_snip_baselines_use_float32_gradients(data):
    prompts, refusals, tokenizer = data
    model = tiny_bf16_llama(tokenizer)
    esi = reference_esi(model, tokenizer, prompts, refusals)
    params = ParameterFilter().select(model)
    grads = {n: esi[n] / params[n].detach().float().std() for n in esi}  # |dS/dw| in float32
    kwargs = dict(targets=refusals, batch_size=BATCH_SIZE, progress=False, ratio=1.0)
    snip = {n: g * params[n].detach().float().abs() for n, g in grads.items()}
    for method, want in (("grad", grads), ("snip", snip)):
        mask = compute_safety_mask(model, tokenizer, prompts, method=method, **kwargs)
        for name, ref in want.items():
            assert mask.scores[name].dtype == torch.float32
            torch.testing.assert_close(mask.scores[name], ref.reshape(-1), rtol=1e-5, atol=1e-12)


def test_esi_module_on_bf16_model_matches_compute_safety_mask(data, tmp_path):
    import lightning as L

    from lit_safety.data.esi import HarmfulPromptsDataModule
    from lit_safety.models.loading import load_model
    from lit_safety.modules.esi import ESIScoringModule

    prompts, refusals, tokenizer = data
    model_dir = tmp_path / "tiny-bf16"
    tiny_bf16_llama(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    module = ESIScoringModule(model=str(model_dir), dtype="bfloat16", selection=SelectionConfig(ratio=RATIO),
                              output_dir=str(tmp_path / "esi"), report=False)
    datamodule = HarmfulPromptsDataModule(tokenizer=str(model_dir), num_samples=N_PROMPTS, batch_size=BATCH_SIZE,
                                          seed=SEED)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    modes = []  # ESI scores the deployed model: eval mode on purpose, and Lightning's warning silenced
    step = module.training_step

    def training_step(batch, batch_idx):
        modes.append(module.model.training)
        return step(batch, batch_idx)

    module.training_step = training_step
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=datamodule)
    assert modes and not any(modes)
    assert not [w for w in caught if "eval mode" in str(w.message)]
    assert next(module.model.parameters()).dtype == torch.bfloat16
    assert all(safety_gradient(p) is None for p in module.model.parameters())
    assert not any(p._post_accumulate_grad_hooks for p in module.model.parameters()
                   if getattr(p, "_post_accumulate_grad_hooks", None) is not None)  # hooks removed

    model = load_model(str(model_dir), dtype="bfloat16")
    reference = reference_esi(model, tokenizer, prompts, refusals)
    expected = compute_safety_mask(model, tokenizer, prompts, targets=refusals, ratio=RATIO, batch_size=BATCH_SIZE,
                                   progress=False)
    got = module.mask
    assert got.k == expected.k and got.metadata["num_examples"] == N_PROMPTS
    assert sorted(got.indices) == sorted(expected.indices) == sorted(reference_selection(reference, got.k, "global"))
    for name in expected.indices:
        assert torch.equal(got.indices[name], expected.indices[name]), name
        assert torch.equal(got.scores[name], expected.scores[name]), name  # one pipeline: the same numbers
        # float32 accumulation under Lightning's manual_backward too
        torch.testing.assert_close(got.scores[name], reference[name].reshape(-1)[got.indices[name]], rtol=1e-6,
                                   atol=1e-12)


# ---- objective="judge" by name ----------------------------------------------------------------------------

def test_judge_by_name_without_guard_is_a_clear_error_before_model_work():
    touched = []

    class Exploding(torch.nn.Module):
        def named_parameters(self, *args, **kwargs):
            touched.append(1)
            raise AssertionError("model touched")

        def forward(self, *args, **kwargs):
            touched.append(1)
            raise AssertionError("model run")

    with pytest.raises(ValueError, match=r"needs a guard model.*make_objective\('judge', guard_model="):
        compute_safety_mask(Exploding(), None, ["How do I pick a lock?"], objective="judge", progress=False)
    with pytest.raises(ValueError, match="guard_model="):
        make_objective("judge")
    with pytest.raises(ValueError, match="judge"):
        compute_safety_mask(Exploding(), None, ["x"], objective="refusal", guard_model="organism-guard")
    assert not touched


@pytest.fixture(scope="module")
def guard_tokenizer(_organism_cache):
    from lit_safety.models.loading import load_tokenizer
    from lit_safety.organism import organism_path

    organism_path("organism-guard:tiny")  # builds the tiny guard once (cached for the session)
    return load_tokenizer("organism-guard:tiny")


def test_judge_objective_the_documented_way(guard_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(guard_tokenizer), hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                         pad_token_id=guard_tokenizer.pad_token_id,
                                         eos_token_id=guard_tokenizer.eos_token_id)).eval()
    prompts = [e.prompt for e in harmful_examples(3, seed=1)]
    objective = make_objective("judge", guard_model="organism-guard:tiny", max_new_tokens=4)
    mask = compute_safety_mask(model, guard_tokenizer, prompts, objective=objective, k=20, progress=False)
    assert mask.k == 20 and mask.metadata["objective"] == "judge" and mask.metadata["num_examples"] == 3
    assert min(float(s.min()) for s in mask.scores.values()) > 0
    # the guard_model= keyword builds the same objective (default options but for the answer length)
    by_keyword = compute_safety_mask(model, guard_tokenizer, prompts, objective="judge",
                                     guard_model="organism-guard:tiny", k=20, progress=False)
    assert by_keyword.k == 20 and by_keyword.metadata["objective"] == "judge"
    assert all(p.grad is None for p in model.parameters())
