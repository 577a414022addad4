"""The judge objective: gradients reach the scored model (shared and transferred vocabularies),
not the guard; argument checks; determinism; and the organism guard trainer."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from lit_safety.data.esi import prompt_batches
from lit_safety.esi.judge_objective import JudgeObjective, build_vocab_transfer
from lit_safety.judges.guard_prompt import guard_prompt_parts
from lit_safety.organism.corpus import benign_examples, harmful_examples
from lit_safety.organism.tokenizer import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # tiny tensors; 2 threads on a busy box are 100x slower

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
    from lit_safety.organism.training import new_model
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


# ---- an independent reference of S --------------------------------------------------------------------
# Per prompt, unpadded: a greedy answer by an argmax loop (no generate()), the teacher-forced logits of
# the answer tokens, Gumbel noise drawn from torch.Generator().manual_seed(seed) one answer after the
# other, and a plain forward of the guard on [prefix, answer, suffix] (token ids for a hard answer in
# a shared vocabulary, otherwise embeddings).


def _greedy_answer(model, prompt_ids: list[int], max_new_tokens: int, eos_id: int) -> list[int]:
    answer: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=torch.tensor([prompt_ids + answer])).logits[0, -1].argmax())
            if token == eos_id:
                break
            answer.append(token)
    return answer


def _answer_logits(model, prompt_ids: list[int], answer: list[int]) -> torch.Tensor:
    """[len(answer), V]: the logits that predicted each answer token."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids + answer])).logits[0].float()
    return logits[len(prompt_ids) - 1 : -1]


def _gumbel(shape, generator) -> torch.Tensor:
    u = torch.rand(shape, generator=generator).clamp(1e-10, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))


def _prompt_rows(batch):
    for row, prompt in enumerate(batch["prompts"]):
        yield prompt, batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()


def _verdict(last: torch.Tensor, safe_id: int, unsafe_id: int | None, score: str) -> torch.Tensor:
    if score == "logit":
        return last[safe_id]
    return torch.log_softmax(torch.stack([last[safe_id], last[unsafe_id]]), dim=0)[0]


def _reference_values(model, model_tok, guard, guard_tok, batch, *, safe: str, unsafe: str | None,
                      max_new_tokens: int, seed: int = 0, temperature: float = 0.3, hard: bool = False,
                      score: str = "logit", transfer: torch.Tensor | None = None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    embeddings = guard.get_input_embeddings().weight
    safe_id = guard_tok.convert_tokens_to_ids(safe)
    unsafe_id = None if unsafe is None else guard_tok.convert_tokens_to_ids(unsafe)
    values = []
    for prompt, prompt_ids in _prompt_rows(batch):
        answer = _greedy_answer(model, prompt_ids, max_new_tokens, model_tok.eos_token_id)
        prefix, suffix = guard_prompt_parts(guard_tok, prompt)
        pre = guard_tok(prefix, add_special_tokens=False)["input_ids"]
        suf = guard_tok(suffix, add_special_tokens=False)["input_ids"]
        y = None
        if answer:
            logits = _answer_logits(model, prompt_ids, answer)
            y = torch.softmax((logits + _gumbel(logits.shape, generator)) / temperature, dim=-1)
            if hard:
                y = torch.nn.functional.one_hot(y.argmax(-1), y.shape[-1]).float()
        with torch.no_grad():
            if y is None or (hard and transfer is None):  # token ids, embedded by the guard itself
                tokens = [] if y is None else y.argmax(-1).tolist()
                last = guard(input_ids=torch.tensor([pre + tokens + suf])).logits[0, -1]
            else:
                probs = y if transfer is None else y @ transfer
                middle = probs @ embeddings[: probs.shape[-1]]
                inputs = torch.cat([embeddings[pre], middle, embeddings[suf]]).unsqueeze(0)
                last = guard(inputs_embeds=inputs).logits[0, -1]
        values.append(_verdict(last.float(), safe_id, unsafe_id, score))
    return torch.stack(values)


def _dense_transfer(model_tok, guard_tok, guard_vocab: int) -> torch.Tensor:
    """[V_model, V_guard]: row v spreads 1/n over the n guard tokens of the text of model token v
    (special tokens and byte pieces that decode to U+FFFD map to nothing)."""
    out = torch.zeros(len(model_tok), guard_vocab)
    for v in range(len(model_tok)):
        text = model_tok.decode([v])
        if v in model_tok.all_special_ids or not text or "\ufffd" in text:
            continue
        ids = guard_tok.encode(text, add_special_tokens=False)
        for g in ids:
            out[v, g] += 1.0 / len(ids)
    return out


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
    values = objective(setup["model"], setup["batch"])
    expected = _reference_values(setup["model"], setup["model_tok"], guard, setup["model_tok"], setup["batch"],
                                 safe="a", unsafe="b", max_new_tokens=6)
    torch.testing.assert_close(values.detach(), expected, rtol=1e-4, atol=1e-5)
    _check_gradients(setup["model"], guard, values)


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
    # S = log p(safe | {safe, unsafe}) of the guard fed (y @ T) @ E_guard for the relaxed answer y
    transfer = _dense_transfer(model_tok, other_tok, guard.get_input_embeddings().num_embeddings)
    torch.testing.assert_close(T.to_dense(), transfer)
    expected = _reference_values(setup["model"], model_tok, guard, other_tok, setup["batch"], safe="safe",
                                 unsafe="unsafe", max_new_tokens=6, score="logprob", transfer=transfer)
    torch.testing.assert_close(values.detach(), expected, rtol=1e-4, atol=1e-5)
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


@pytest.mark.parametrize("score", ["logit", "logprob"])
def test_hard_value_is_the_guard_verdict_on_the_greedy_answer(setup, score):
    """With hard=True the guard reads one-hot answer tokens: S equals the guard's safe logit (or
    log p(safe | {safe, unsafe})) from a plain forward of the guard on the prompt's template with the
    greedy answer's token ids. The scored model's logits are scaled so far apart that the Gumbel noise
    (within [-3.2, 16.2]) cannot change any argmax: the hard tokens are the greedy ones."""
    tok = setup["model_tok"]
    model = copy.deepcopy(setup["model"])
    with torch.no_grad():
        model.lm_head.weight.mul_(1e5)
    guard = _tiny_llama(tok, 1)
    objective = JudgeObjective(guard, tok, safe_token="a", unsafe_token="b", max_new_tokens=6, hard=True,
                               score=score, seed=4).bind(tok)
    values = objective(model, setup["batch"])
    safe_id, unsafe_id = tok.convert_tokens_to_ids(["a", "b"])
    expected = []
    for prompt, prompt_ids in _prompt_rows(setup["batch"]):
        answer = _greedy_answer(model, prompt_ids, 6, tok.eos_token_id)
        assert len(answer) == 6
        top2 = _answer_logits(model, prompt_ids, answer).topk(2, dim=-1).values
        assert ((top2[:, 0] - top2[:, 1]) > 20).all()  # no Gumbel draw can flip the argmax
        prefix, suffix = guard_prompt_parts(tok, prompt)
        text = tok.apply_chat_template([{"role": "user", "content": prompt},
                                        {"role": "assistant", "content": "ANSWER"}], tokenize=False,
                                       add_generation_prompt=True)
        assert text == prefix + "ANSWER" + suffix  # the guard sees its own template around the answer
        ids = tok(prefix, add_special_tokens=False)["input_ids"] + answer + tok(suffix, add_special_tokens=False)[
            "input_ids"]
        with torch.no_grad():
            last = guard(input_ids=torch.tensor([ids])).logits[0, -1]
        expected.append(_verdict(last, safe_id, unsafe_id, score))
    torch.testing.assert_close(values.detach(), torch.stack(expected))


@pytest.mark.parametrize("hard", [False, True])
def test_values_reproduce_the_gumbel_softmax_relaxation(setup, hard):
    """S of the soft (y = softmax((logits + g) / T)) and straight-through (one-hot argmax y) relaxations,
    against the reference with the same seeded noise; the straight-through S still has a gradient."""
    tok = setup["model_tok"]
    guard = _tiny_llama(tok, 1)
    objective = JudgeObjective(guard, tok, safe_token="a", unsafe_token="b", max_new_tokens=6, hard=hard,
                               temperature=0.7, seed=5).bind(tok)
    values = objective(setup["model"], setup["batch"])
    expected = _reference_values(setup["model"], tok, guard, tok, setup["batch"], safe="a", unsafe="b",
                                 max_new_tokens=6, seed=5, temperature=0.7, hard=hard)
    torch.testing.assert_close(values.detach(), expected, rtol=1e-4, atol=1e-5)
    _check_gradients(setup["model"], guard, values)


def test_relaxation_by_hand(setup):
    """y = softmax((l + g) / T) with g = -log(-log(u)), u = torch.rand from the seeded generator,
    computed with math on a known logit vector; lower T -> closer to one-hot; hard=True gives the
    one-hot of argmax(l + g) in the forward pass and the soft y's gradient in the backward pass."""
    guard, tok = _tiny_llama(setup["model_tok"], 1), setup["model_tok"]
    logits = [2.0, 0.5, -1.0, 0.0, 1.5]
    u = torch.rand((1, len(logits)), generator=torch.Generator().manual_seed(5))[0].tolist()
    noisy = [l_j - math.log(-math.log(u_j)) for l_j, u_j in zip(logits, u)]
    winner = max(range(len(noisy)), key=noisy.__getitem__)
    one_hot = torch.nn.functional.one_hot(torch.tensor([winner]), len(logits)).float()

    def by_hand(temperature):
        z = [n / temperature for n in noisy]
        e = [math.exp(v - max(z)) for v in z]
        return torch.tensor([[v / sum(e) for v in e]])

    distances = []
    for temperature in (2.0, 1.0, 0.3, 0.05):
        objective = JudgeObjective(guard, tok, safe_token="a", unsafe_token=None, temperature=temperature, seed=5)
        y = objective._relax(torch.tensor([logits]))
        torch.testing.assert_close(y, by_hand(temperature), rtol=1e-5, atol=1e-7)
        distances.append(float((y - one_hot).abs().sum()))
    assert distances == sorted(distances, reverse=True) and distances[-1] < 1e-2

    temperature = 0.7
    weights = torch.tensor([[0.3, -1.2, 0.7, 2.0, -0.4]])
    hard = JudgeObjective(guard, tok, safe_token="a", unsafe_token=None, temperature=temperature, seed=5, hard=True)
    leaf = torch.tensor([logits], requires_grad=True)
    y = hard._relax(leaf)
    assert torch.equal(y.detach(), one_hot)  # one_hot - y + y: exactly the one-hot
    (y * weights).sum().backward()
    soft = by_hand(temperature)  # d/dl sum(w * softmax(z / T)) = soft * (w - <soft, w>) / T
    torch.testing.assert_close(leaf.grad, soft * (weights - (soft * weights).sum()) / temperature)
    assert leaf.grad.abs().sum() > 0


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
    assert info["training"]["steps"] == 4 and info["heldout_examples"] == 16
    guard, guard_tok = load_model_and_tokenizer(str(out))
    # the recorded held-out accuracy: the saved guard's safe/unsafe logit comparison on the 16 held-out
    # conversations (seed spec.seed + 1), one unpadded conversation at a time
    from lit_safety.organism.guard import encode_guard_example, guard_spec, guard_training_examples

    heldout = guard_training_examples(16, seed=guard_spec(PRESETS["tiny"]["dense"]).seed + 1, split="heldout")
    safe_id, unsafe_id = guard_tok.convert_tokens_to_ids(["safe", "unsafe"])
    for cap, key in ((64, "heldout_accuracy"), (32, "heldout_accuracy_answers_32_tokens")):
        right = {"safe": [], "unsafe": []}
        for conversation, label in heldout:
            ids = encode_guard_example(guard_tok, tok, conversation, None, max_answer_tokens=cap)["input_ids"]
            with torch.no_grad():
                last = guard(input_ids=torch.tensor([ids])).logits[0, -1]
            right[label].append(bool(last[unsafe_id] > last[safe_id]) == (label == "unsafe"))
        assert len(right["safe"]) == len(right["unsafe"]) == 8
        assert info[key] == sum(right["safe"] + right["unsafe"]) / 16, key
        if cap == 64:
            assert info["heldout_unsafe_recall"] == sum(right["unsafe"]) / 8
            assert info["heldout_safe_recall"] == sum(right["safe"]) / 8
    assert len(guard_tok.encode("safe", add_special_tokens=False)) == 1
    assert "Is the assistant's last answer safe or unsafe?" in guard_tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    objective = JudgeObjective(str(out), max_new_tokens=4).bind(tok)  # the defaults: "safe" / "unsafe"
    assert objective.shared_vocab
    values = objective(setup["model"], setup["batch"])
    setup["model"].zero_grad(set_to_none=True)
    values.sum().backward()
    assert setup["model"].model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
