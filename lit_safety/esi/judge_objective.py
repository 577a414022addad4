"""The judge-guided safety objective: S = a guard model's "safe" score of the scored model's answer.

For each harmful prompt of a batch:

1. the scored model answers greedily (no gradient);
2. the scored model is run again, with gradient, over prompt + answer (teacher forcing), giving
   the logits that produced each answer token;
3. each answer token is relaxed with Gumbel-softmax, ``y = softmax((logits + g) / temperature)``
   (straight-through one-hot with ``hard=True``);
4. the relaxed tokens enter the guard as embeddings: ``y @ E_guard`` when the guard shares the
   scored model's vocabulary, otherwise ``y @ (T @ E_guard)`` with ``T`` a sparse vocabulary
   transfer matrix (computed as ``(y @ T) @ E_guard``, so ``T @ E_guard`` is never materialised).
   They sit between the guard prompt's prefix and suffix, rendered from the guard tokenizer's chat
   template around the user prompt;
5. ``S`` is the guard's logit of the safe token at the last position (``score="logit"``), or
   ``log p(safe | {safe, unsafe})`` (``score="logprob"``).

Only the scored model gets gradients; the guard is frozen. Higher S = safer.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from lit_safety.generation import accepts_argument, tail_logits
from lit_safety.judges.base import model_label
from lit_safety.judges.guard_prompt import guard_prompt_parts, single_token_id
from lit_safety.models.loading import load_model, load_tokenizer

SCORES = ("logit", "logprob")


def shares_vocabulary(model_tokenizer: Any, guard_tokenizer: Any) -> bool:
    """True when every token of the scored model has the same id in the guard's vocabulary
    (the guard may have extra tokens after them)."""
    if model_tokenizer is guard_tokenizer:
        return True
    guard_vocab = guard_tokenizer.get_vocab()
    return all(guard_vocab.get(token) == idx for token, idx in model_tokenizer.get_vocab().items())


def build_vocab_transfer(model_tokenizer: Any, guard_tokenizer: Any, *, model_vocab_size: int | None = None,
                         guard_vocab_size: int | None = None) -> torch.Tensor:
    """Sparse [V_model, V_guard] matrix: row v spreads weight 1/n over the n guard tokens of
    ``guard_tok.encode(model_tok.decode([v]))``.

    Special tokens of the scored model, tokens that decode to nothing or to an incomplete
    character (byte pieces of multi-byte characters) and ids beyond the tokenizer map to nothing
    (an all-zero row).
    """
    n_model = len(model_tokenizer)
    rows_total = max(model_vocab_size or 0, n_model)
    cols_total = max(guard_vocab_size or 0, len(guard_tokenizer))
    special = set(model_tokenizer.all_special_ids)
    special.update(i for i, tok in getattr(model_tokenizer, "added_tokens_decoder", {}).items()
                   if getattr(tok, "special", False))
    ids = [v for v in range(n_model) if v not in special]
    texts = model_tokenizer.batch_decode([[v] for v in ids], skip_special_tokens=False,
                                         clean_up_tokenization_spaces=False)
    keep = [(v, t) for v, t in zip(ids, texts) if t and "\ufffd" not in t]
    encoded = guard_tokenizer([t for _, t in keep], add_special_tokens=False)["input_ids"] if keep else []
    rows, cols, vals = [], [], []
    for (v, _), guard_ids in zip(keep, encoded):
        if not guard_ids:
            continue
        weight = 1.0 / len(guard_ids)
        for g in guard_ids:  # repeated ids are summed by coalesce()
            rows.append(v)
            cols.append(g)
            vals.append(weight)
    index = torch.tensor([rows, cols], dtype=torch.long).reshape(2, -1)
    return torch.sparse_coo_tensor(index, torch.tensor(vals, dtype=torch.float32), (rows_total, cols_total),
                                   check_invariants=True).coalesce()


class JudgeObjective:
    """Judge-guided safety objective (see the module docstring).

    Args:
        guard_model: the guard: a loaded causal LM, or a hub id / HF directory / organism name
            (loaded with :func:`lit_safety.models.loading.load_model_and_tokenizer`).
        guard_tokenizer: the guard's tokenizer (required when ``guard_model`` is a module).
        safe_token / unsafe_token: verdict words; each must be exactly one guard token.
        temperature: Gumbel-softmax temperature (> 0).
        max_new_tokens: length of the answers the scored model generates (>= 1).
        guard_response_prefix: text the guard writes before its verdict ("\\n\\n" for Llama Guard 3).
        score: ``logit`` (the safe token's logit) or ``logprob`` (log-softmax over safe/unsafe).
        seed: seed of the Gumbel noise (same seed and call sequence -> same values).
        trust_remote_code: passed to the guard loader.
        hard: straight-through Gumbel-softmax (one-hot forward, soft gradient).
        guard_dtype: dtype the guard is loaded in when ``guard_model`` is a name.
    """

    name = "judge"
    target = None

    def __init__(
        self,
        guard_model: str | os.PathLike | torch.nn.Module,
        guard_tokenizer: Any = None,
        *,
        safe_token: str = "safe",
        unsafe_token: str | None = "unsafe",
        temperature: float = 0.3,
        max_new_tokens: int = 32,
        guard_response_prefix: str = "",
        score: str = "logit",
        seed: int = 0,
        trust_remote_code: bool = False,
        hard: bool = False,
        guard_dtype: str | torch.dtype | None = "float32",
    ) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens}")
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        if score == "logprob" and unsafe_token is None:
            raise ValueError("score='logprob' compares the safe and unsafe tokens: give unsafe_token")
        if isinstance(guard_model, torch.nn.Module):
            if guard_tokenizer is None:
                raise ValueError("guard_tokenizer is required when guard_model is a loaded model")
            self.guard_name = model_label(guard_model)
            self._move_guard = False  # the caller placed it
        else:
            self.guard_name = os.fspath(guard_model)
            if guard_tokenizer is None:
                guard_tokenizer = load_tokenizer(guard_model, trust_remote_code=trust_remote_code)
            guard_model = load_model(guard_model, dtype=guard_dtype, trust_remote_code=trust_remote_code)
            self._move_guard = True  # follows the scored model's device
        self.guard = guard_model
        self.guard_tokenizer = guard_tokenizer
        self.safe_token = safe_token
        self.unsafe_token = unsafe_token
        self.safe_id = self._single_token_id(safe_token, "safe_token")
        self.unsafe_id = None if unsafe_token is None else self._single_token_id(unsafe_token, "unsafe_token")
        self.temperature = float(temperature)
        self.max_new_tokens = int(max_new_tokens)
        self.guard_response_prefix = guard_response_prefix
        self.score = score
        self.seed = seed
        self.hard = hard
        guard_prompt_parts(guard_tokenizer, "test", guard_response_prefix)  # the template works: fail now
        self.guard.eval()
        self.guard.requires_grad_(False)
        self.generator = torch.Generator().manual_seed(seed)
        self.model_tokenizer: Any = None
        self.shared_vocab: bool | None = None
        self.transfer: torch.Tensor | None = None  # sparse [V_model, V_guard], None when shared
        self._transfer_t: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def _single_token_id(self, token: str, what: str) -> int:
        return single_token_id(self.guard_tokenizer, token, what=what, model_name=self.guard_name)[0]

    # ---- setup -------------------------------------------------------------------------------

    def bind(self, model_tokenizer: Any) -> JudgeObjective:
        """Attach the scored model's tokenizer; builds the vocabulary transfer if the guard's
        vocabulary differs. Call once before the objective is used."""
        if model_tokenizer is self.model_tokenizer:
            return self
        self.model_tokenizer = model_tokenizer
        self.shared_vocab = shares_vocabulary(model_tokenizer, self.guard_tokenizer)
        self._transfer_t = {}
        if self.shared_vocab:
            self.transfer = None
        else:
            self.transfer = build_vocab_transfer(
                model_tokenizer, self.guard_tokenizer,
                guard_vocab_size=self.guard.get_input_embeddings().num_embeddings,
            )
        return self

    def _eos_ids(self, model: Any) -> list[int]:
        ids: list[int] = []
        for source in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                       self.model_tokenizer.eos_token_id):
            if source is None:
                continue
            ids.extend(source if isinstance(source, (list, tuple)) else [source])
        if not ids:
            raise ValueError("the judge objective needs an eos token (tokenizer or generation config) to end answers")
        return sorted(set(int(i) for i in ids))

    # ---- the objective -----------------------------------------------------------------------

    def __call__(self, model: Any, batch: dict[str, Any]) -> torch.Tensor:
        if self.model_tokenizer is None:
            raise RuntimeError("JudgeObjective.bind(tokenizer) must be called with the scored model's tokenizer first")
        if "prompts" not in batch:
            raise ValueError("judge batches need the prompt strings under 'prompts'")
        if len(batch["prompts"]) != batch["input_ids"].shape[0]:
            raise ValueError(f"judge batch has {batch['input_ids'].shape[0]} rows but {len(batch['prompts'])} prompts")
        device = next(model.parameters()).device
        if self._move_guard:
            guard_param = next(self.guard.parameters())
            if guard_param.device != device:
                self.guard.to(device)
        input_ids = batch["input_ids"].to(device)
        attention_mask = batch.get("attention_mask")
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
        eos_ids = self._eos_ids(model)
        pad_id = self.model_tokenizer.pad_token_id
        pad_id = eos_ids[0] if pad_id is None else pad_id
        extra: dict[str, Any] = {}
        if getattr(getattr(model, "config", None), "output_router_logits", None) is not None:
            extra["output_router_logits"] = False  # batched padded generate() breaks on MoE otherwise

        # (1) greedy answers
        with torch.no_grad():
            generated = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=self.max_new_tokens,
                do_sample=False, pad_token_id=pad_id, eos_token_id=eos_ids, **extra,
            )
        prompt_len = input_ids.shape[1]
        answer = generated[:, prompt_len:]
        lengths = self._answer_lengths(answer, eos_ids)

        # (2) teacher-forced pass with gradient; logits at the positions that predict each answer token
        n_answer = answer.shape[1]
        if n_answer == 0 or int(lengths.max()) == 0:
            logits = None
        else:
            full_mask = torch.cat([attention_mask, torch.ones_like(answer)], dim=1)
            logits = tail_logits(model, generated, full_mask, n_answer + 1, **extra)[:, :-1].float()  # [B, L, V]

        guard_embeddings = self.guard.get_input_embeddings().weight
        guard_device = guard_embeddings.device
        values = []
        for i, prompt in enumerate(batch["prompts"]):
            n = int(lengths[i])
            soft = None
            if n > 0:
                y = self._relax(logits[i, :n])  # [n, V_model]
                soft = self._soft_embeddings(y.to(guard_device), guard_embeddings)
            values.append(self._guard_score(prompt, soft, guard_embeddings).to(device))
        values = torch.stack(values)
        if torch.is_grad_enabled() and not values.requires_grad:
            # every answer was empty: S does not depend on the weights; keep backward() working
            trainable = next((p for p in model.parameters() if p.requires_grad), None)
            if trainable is not None:
                values = values + 0.0 * trainable.sum()
        return values

    @staticmethod
    def _answer_lengths(answer: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
        """Real answer tokens per row: those before the first eos (pad follows eos in generate())."""
        is_eos = torch.isin(answer, torch.tensor(eos_ids, device=answer.device))
        after = is_eos.long().cumsum(dim=1) > 0
        return (~after).sum(dim=1)

    def _relax(self, logits: torch.Tensor) -> torch.Tensor:
        uniform = torch.rand(logits.shape, generator=self.generator).to(logits.device)
        gumbel = -torch.log(-torch.log(uniform.clamp(1e-10, 1.0 - 1e-7)))
        y = torch.softmax((logits + gumbel) / self.temperature, dim=-1)
        if self.hard:
            one_hot = torch.nn.functional.one_hot(y.argmax(-1), y.shape[-1]).to(y.dtype)
            y = one_hot - y.detach() + y
        return y

    def _soft_embeddings(self, y: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        if self.transfer is None:  # shared vocabulary: ids mean the same tokens
            n = min(y.shape[-1], embeddings.shape[0])
            return y[:, :n].to(embeddings.dtype) @ embeddings[:n]
        transfer_t = self._transfer_on(y.device)  # [V_guard, V_model]
        rows = transfer_t.shape[1]
        if y.shape[-1] >= rows:
            y = y[:, :rows]
        else:
            y = torch.nn.functional.pad(y, (0, rows - y.shape[-1]))
        guard_probs = torch.sparse.mm(transfer_t, y.t().float()).t()  # y @ T: [n, V_guard]
        return guard_probs.to(embeddings.dtype) @ embeddings[: guard_probs.shape[-1]]

    def _transfer_on(self, device: torch.device) -> torch.Tensor:
        key = (device, torch.float32)
        if key not in self._transfer_t:
            self._transfer_t[key] = self.transfer.t().coalesce().to(device)
        return self._transfer_t[key]

    def _guard_score(self, prompt: str, soft: torch.Tensor | None, embeddings: torch.Tensor) -> torch.Tensor:
        prefix, suffix = guard_prompt_parts(self.guard_tokenizer, prompt, self.guard_response_prefix)
        encode = self.guard_tokenizer
        prefix_ids = encode(prefix, add_special_tokens=False)["input_ids"]
        suffix_ids = encode(suffix, add_special_tokens=False)["input_ids"]
        device = embeddings.device
        parts = [embeddings[torch.tensor(prefix_ids, dtype=torch.long, device=device)]]
        if soft is not None:
            parts.append(soft)
        parts.append(embeddings[torch.tensor(suffix_ids, dtype=torch.long, device=device)])
        inputs = torch.cat(parts, dim=0).unsqueeze(0)
        kwargs: dict[str, Any] = dict(inputs_embeds=inputs, attention_mask=torch.ones(inputs.shape[:2], dtype=torch.long,
                                                                                       device=device))
        if accepts_argument(self.guard, "logits_to_keep"):
            kwargs["logits_to_keep"] = 1
        last = self.guard(**kwargs).logits[0, -1].float()
        if self.score == "logit":
            return last[self.safe_id]
        pair = torch.stack([last[self.safe_id], last[self.unsafe_id]])
        return torch.log_softmax(pair, dim=0)[0]

    def __repr__(self) -> str:
        return (f"JudgeObjective(guard={self.guard_name!r}, safe_token={self.safe_token!r}, "
                f"unsafe_token={self.unsafe_token!r}, temperature={self.temperature}, "
                f"max_new_tokens={self.max_new_tokens}, score={self.score!r}, seed={self.seed})")
