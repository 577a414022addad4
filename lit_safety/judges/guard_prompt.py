"""The guard prompt around an answer and the guard's verdict tokens: shared by the guard judge
(:mod:`lit_safety.judges.guard`), the judge objective (:mod:`lit_safety.esi.judge_objective`) and
the organism guard's training."""

from __future__ import annotations

from typing import Any

SENTINEL = "LITSAFETYRESPONSESENTINEL"


def guard_prompt_parts(tokenizer: Any, prompt: str, response_prefix: str = "") -> tuple[str, str]:
    """(text before, text after) the assistant's answer in the guard's chat template.

    Renders ``[user: prompt, assistant: SENTINEL]`` with the generation prompt (templates that
    ignore ``add_generation_prompt`` or refuse it after an assistant turn are rendered without it)
    and splits at the sentinel; ``response_prefix`` (e.g. ``"\\n\\n"`` for Llama Guard 3) is
    appended to the suffix, so the next token the guard predicts is its verdict.
    """
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"guard tokenizer {name!r} has no chat_template; the judge objective builds the guard "
                         "prompt from it (set tokenizer.chat_template)")
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": SENTINEL}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # some templates raise for a generation prompt after an assistant turn
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    if not isinstance(text, str) or text.count(SENTINEL) != 1:
        raise ValueError(f"guard tokenizer {name!r}: its chat template does not render the assistant's answer "
                         "verbatim exactly once, so the judge objective cannot place the answer in the guard prompt")
    prefix, suffix = text.split(SENTINEL)
    return prefix, suffix + response_prefix


def single_token_id(tokenizer: Any, token: str, *, what: str, model_name: str,
                    try_leading_space: bool = False) -> tuple[int, str]:
    """``(id, form)`` of the verdict word ``token`` when it is exactly one known token of ``tokenizer``.

    ``form`` is the string that encodes to that token. With ``try_leading_space``, a word that is
    not one token as given is also tried with a leading space added (or removed, when it has one);
    the form as given wins when both are single tokens. A word that encodes to the tokenizer's
    unknown token does not count. Otherwise raises ``ValueError`` naming ``what`` (the setting,
    e.g. ``"unsafe_token"``), the model and what the tokenizer produced for each form tried.
    """
    forms = [token]
    if try_leading_space and token.strip():
        forms.append(token[1:] if token.startswith(" ") else " " + token)
    unk_id = getattr(tokenizer, "unk_token_id", None)
    tried = []
    for form in forms:
        ids = tokenizer.encode(form, add_special_tokens=False)
        if len(ids) == 1 and (ids[0] != unk_id or form == tokenizer.unk_token):
            return ids[0], form
        pieces = tokenizer.convert_ids_to_tokens(ids)
        if len(ids) == 1:
            tried.append(f"{form!r} -> the unknown token {pieces[0]!r} (id {ids[0]})")
        else:
            tried.append(f"{form!r} -> {len(ids)} tokens {pieces!r} (ids {ids})")
    raise ValueError(
        f"{what} {token!r} must be exactly one token of the guard {model_name!r}, but its tokenizer encodes "
        f"{'; '.join(tried)}; pass the guard's verdict word as it is tokenized (e.g. with or without a leading "
        "space)"
    )
