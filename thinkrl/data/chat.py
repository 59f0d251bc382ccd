"""Chat templates -> token ids, with the assistant mask (which tokens are the model's own).

    ids = encode_prompt(tok, [{"role": "user", "content": "12+34"}])          # ends with the generation prompt
    ids, mask = encode_example(tok, messages)                                  # mask: True on assistant tokens

The mask comes from the template's ``{% generation %}`` markers when it has them. Many templates have none;
HF then returns an all-False mask, so the mask is built from prefix differences instead (OpenPipe ART's fix):
the tokens between the conversation rendered up to an assistant turn's generation prompt and rendered through
that turn are the turn's (its content and end-of-turn tokens).
"""
from __future__ import annotations

ROLES = ("system", "user", "assistant", "tool")


def encode_prompt(tokenizer, messages: list[dict] | str) -> list[int]:
    """Token ids of a prompt, ending with the generation prompt (e.g. ``<|assistant|>``)."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        return list(out["input_ids"])
    text = "".join(m["content"] for m in messages)  # no template: plain text prompt
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def has_generation_markers(template: str) -> bool:
    """Whether a chat template marks the assistant's tokens (``{% generation %}``, any whitespace control)."""
    return any(f"{{%{a} generation {b}%}}" in template for a in ("", "-") for b in ("", "-"))


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                        return_dict=True)
    return list(out["input_ids"])


def prefix_mask(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """(ids, assistant mask) from prefix differences, for templates without generation markers. Raises ValueError
    when the template is not prefix-stable (an earlier turn renders differently once later turns follow)."""
    ids: list[int] = []
    mask: list[bool] = []
    for i, m in enumerate(messages):
        full = _render(tokenizer, messages[: i + 1], False)
        start = len(ids)
        if m["role"] == "assistant":
            prompt = _render(tokenizer, messages[:i], True) if i else []
            start = len(prompt)
            if full[:start] != prompt:
                raise ValueError("chat template is not prefix-stable: an assistant turn does not follow its generation "
                                 "prompt; add {% generation %} markers to it")
        if full[: len(ids)] != ids:
            raise ValueError(f"chat template is not prefix-stable: message {i} changes how the earlier ones render; "
                             "add {% generation %} markers to it")
        mask += [False] * (start - len(ids)) + [m["role"] == "assistant"] * (len(full) - start)
        ids = full
    return ids, mask


def encode_example(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Token ids of a whole conversation and the mask of assistant tokens (for SFT).

    Uses the template's ``{% generation %}`` markers when it has them (and they mark something); otherwise the
    prefix differences of `prefix_mask`. A tokenizer without a chat template is a ValueError."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if not template:
        raise ValueError("the tokenizer has no chat template: SFT on messages needs one (set tokenizer.chat_template)")
    if has_generation_markers(template):
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        mask = [bool(m) for m in out["assistant_masks"]]
        if any(mask) or not any(m["role"] == "assistant" and m["content"] for m in messages):
            return list(out["input_ids"]), mask
    return prefix_mask(tokenizer, messages)
