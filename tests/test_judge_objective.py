"""The judge objective: gradients reach the scored model (shared and transferred vocabularies),
not the guard; argument checks; determinism; and the organism guard trainer."""

from __future__ import annotations

import json

import pytest
import torch

from lit_safety.data.esi import prompt_batches
from lit_safety.esi.judge_objective import JudgeObjective, build_vocab_transfer, guard_prompt_parts
from lit_safety.organism.corpus import benign_examples, harmful_examples
from lit_safety.organism.tokenizer import train_tokenizer

# A Llama-Guard-like template for a tokenizer that is not the scored model's.
OTHER_TEMPLATE = (
    "<s>[INST] Task: check the Agent's answer.\n"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n' }}"
    "{% else %}{{ 'Agent: ' + message['content'] + '\n' }}{% endif %}"
    "{% endfor %}"
    "{{ 'Answer safe or unsafe. [/INST]' }}"
)


def _texts(seed: int, n: int = 150) -> list[str]:
    texts = []
    for ex in harmful_examples(n, seed=seed) + benign_examples(n, seed=seed):
        texts.extend(t for t in (ex.prompt, ex.response, ex.refusal) if t)
    return texts


def _tiny_llama(tokenizer, seed: int):
    from lit_safety.organism.build import new_model
    from lit_safety.organism.specs import PRESETS

    spec = PRESETS["tiny"]["dense"].replace(hidden_size=32, num_layers=2, intermediate_size=64)
    torch.manual_seed(seed)
    return new_model(spec, tokenizer).eval()


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model_tok = train_tokenizer(_texts(0), vocab_size=400)
    # The other guard's tokenizer: other texts, another vocabulary size; "safe"/"unsafe" are
    # frequent whole words there, so each is one token.
    other_tok = train_tokenizer(_texts(7, 100) + ["safe", "unsafe"] * 200, vocab_size=330)
    other_tok.chat_template = OTHER_TEMPLATE
    model = _tiny_llama(model_tok, 0)
    prompts = [ex.prompt for ex in harmful_examples(3, seed=11)]
    batch = prompt_batches(model_tok, prompts, objective="judge", batch_size=3)[0]
    return {"model_tok": model_tok, "other_tok": other_tok, "model": model, "batch": batch}


def _check_gradients(model, guard, values):
    assert values.shape == (3,) and torch.isfinite(values).all()
    model.zero_grad(set_to_none=True)
    values.sum().backward()
    for layer in model.model.layers:
        for weight in (layer.self_attn.q_proj.weight, layer.self_attn.v_proj.weight, layer.mlp.down_proj.weight,
                       layer.mlp.gate_proj.weight):
            assert weight.grad is not None and torch.isfinite(weight.grad).all()
            assert weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in guard.parameters())
    assert not any(p.requires_grad for p in guard.parameters())


def test_shared_vocabulary_guard(setup):
    guard = _tiny_llama(setup["model_tok"], 1)
    objective = JudgeObjective(guard, setup["model_tok"], safe_token="a", unsafe_token="b", max_new_tokens=6)
    objective.bind(setup["model_tok"])
    assert objective.shared_vocab and objective.transfer is None
    _check_gradients(setup["model"], guard, objective(setup["model"], setup["batch"]))


def test_transferred_vocabulary_guard(setup):
    model_tok, other_tok = setup["model_tok"], setup["other_tok"]
    guard = _tiny_llama(other_tok, 2)
    objective = JudgeObjective(guard, other_tok, max_new_tokens=6, score="logprob").bind(model_tok)
    assert not objective.shared_vocab
    T = objective.transfer
    assert T.is_sparse and T.shape == (len(model_tok), guard.get_input_embeddings().num_embeddings)
    assert T._nnz() < 0.05 * T.shape[0] * T.shape[1]
    row_sums = torch.sparse.sum(T, dim=1).to_dense()
    assert torch.allclose(row_sums[row_sums > 0], torch.ones(1), atol=1e-5)
    assert ((row_sums == 0) | (row_sums - 1).abs().lt(1e-5)).all()
    for special in model_tok.all_special_ids:
        assert row_sums[special] == 0
    # every token that decodes to whole characters is mapped (byte pieces of multi-byte
    # characters decode to U+FFFD and are not)
    clean = [v for v in range(len(model_tok)) if v not in model_tok.all_special_ids
             and "\ufffd" not in model_tok.decode([v])]
    assert len(clean) > 200 and (row_sums[clean] > 0).all()
    values = objective(setup["model"], setup["batch"])
    assert (values <= 0).all()  # log p(safe | {safe, unsafe})
    _check_gradients(setup["model"], guard, values)


def test_transfer_rows_match_guard_tokens(setup):
    model_tok, other_tok = setup["model_tok"], setup["other_tok"]
    T = build_vocab_transfer(model_tok, other_tok).to_dense()
    v = model_tok.convert_tokens_to_ids("Ġhere")
    expected = other_tok.encode(" here", add_special_tokens=False)
    assert set(T[v].nonzero().flatten().tolist()) == set(expected)


def test_argument_checks(setup):
    guard = _tiny_llama(setup["model_tok"], 1)
    tok = setup["model_tok"]
    with pytest.raises(ValueError, match=r"safe_token 'definitely safe'.*tokens"):
        JudgeObjective(guard, tok, safe_token="definitely safe", unsafe_token=None)
    with pytest.raises(ValueError, match="unsafe_token 'unsafe'"):
        JudgeObjective(guard, tok, safe_token="a", unsafe_token="unsafe")
    with pytest.raises(ValueError, match="temperature"):
        JudgeObjective(guard, tok, safe_token="a", unsafe_token=None, temperature=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        JudgeObjective(guard, tok, safe_token="a", unsafe_token=None, max_new_tokens=0)
    with pytest.raises(ValueError, match="guard_tokenizer"):
        JudgeObjective(guard, safe_token="a")
    objective = JudgeObjective(guard, tok, safe_token="a", unsafe_token=None)
    with pytest.raises(RuntimeError, match="bind"):
        objective(setup["model"], setup["batch"])


def test_guard_prompt_parts_split_the_template(setup):
    prefix, suffix = guard_prompt_parts(setup["other_tok"], "How?", "\n\n")
    assert prefix.endswith("User: How?\nAgent: ") and suffix == "\nAnswer safe or unsafe. [/INST]\n\n"


def test_same_seed_same_values(setup):
    guard = _tiny_llama(setup["model_tok"], 1)

    def run(seed):
        objective = JudgeObjective(guard, setup["model_tok"], safe_token="a", unsafe_token=None,
                                   max_new_tokens=6, seed=seed).bind(setup["model_tok"])
        with torch.no_grad():
            return objective(setup["model"], setup["batch"])

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_train_guard_tiny(setup, tmp_path):
    from lit_safety.models.loading import load_model_and_tokenizer
    from lit_safety.organism.guard import train_guard
    from lit_safety.organism.specs import PRESETS

    tok = setup["model_tok"]
    out = train_guard(PRESETS["tiny"]["dense"], tok, tmp_path / "guard", steps=4, n_heldout=16,
                      log=lambda _: None, progress=False)
    info = json.loads((out / "guard.json").read_text())
    assert 0.0 <= info["heldout_accuracy"] <= 1.0 and info["training"]["steps"] == 4
    guard, guard_tok = load_model_and_tokenizer(str(out))
    assert len(guard_tok.encode("safe", add_special_tokens=False)) == 1
    assert "Is the assistant's last answer safe or unsafe?" in guard_tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    objective = JudgeObjective(str(out), max_new_tokens=4).bind(tok)  # the defaults: "safe" / "unsafe"
    assert objective.shared_vocab
    values = objective(setup["model"], setup["batch"])
    setup["model"].zero_grad(set_to_none=True)
    values.sum().backward()
    assert setup["model"].model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
