"""Chat templates -> token ids, with the assistant mask (which tokens are the model's own)."""
from __future__ import annotations


def encode_prompt(tokenizer, messages: list[dict] | str) -> list[int]:
    """Token ids of a prompt, ending with the generation prompt (e.g. ``<|assistant|>``)."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        return list(out["input_ids"])
    text = "".join(m["content"] for m in messages)  # no template: plain text prompt
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def encode_example(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Token ids of a whole conversation and the mask of assistant tokens (for SFT).

    Uses the template's ``{% generation %}`` markers when it has them; otherwise falls back to
    prefix differences (the tokens after each assistant turn's generation prompt).
    """
    template = getattr(tokenizer, "chat_template", None) or ""
    if "{% generation %}" in template or "{%- generation %}" in template:
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids = list(out["input_ids"])
        mask = [bool(m) for m in out["assistant_masks"]]
        return ids, mask
    ids: list[int] = []
    mask: list[bool] = []
    for i, m in enumerate(messages):
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=True, return_dict=True)["input_ids"]
        if m["role"] == "assistant":
            prefix = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
            if list(full[: len(prefix)]) != list(prefix):
                raise ValueError("chat template is not prefix-stable; add {% generation %} markers to it")
            mask += [False] * (len(prefix) - len(ids)) + [True] * (len(full) - len(prefix))
        else:
            mask += [False] * (len(full) - len(ids))
        ids = list(full)
    return ids, mask
