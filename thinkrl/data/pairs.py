"""Preference pairs: read JSONL rows in TRL's formats and tokenise them the way TRL's DPOTrainer does.

Accepted rows (one JSON object a line):

- conversational (what `thinkrl pairs` writes): ``prompt`` a list of messages, ``chosen`` and ``rejected`` each a
  list with one assistant message;
- conversational, implicit prompt: ``chosen`` and ``rejected`` whole conversations; the prompt is their common
  leading messages;
- standard: strings ``prompt``, ``chosen``, ``rejected`` (plain text, no chat template; the eos token is appended
  to each completion that lacks it).

Tokenising (as TRL 1.16): the prompt with the generation prompt, and prompt + completion through the chat
template; the completion starts where the two token lists diverge, so it holds the answer and its end token.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from thinkrl.data.datasets import iter_jsonl


@dataclass
class PairTokens:
    """A tokenised pair: the shared prompt and each completion (the completion's end token included)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


@dataclass
class Pair:
    id: str
    prompt: list[dict] | str
    chosen: list[dict] | str
    rejected: list[dict] | str
    meta: dict = field(default_factory=dict)  # chosen_model, rejected_model, rewards: carried, not trained on


def _messages(v) -> bool:
    return isinstance(v, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in v)


def parse_pair(row: dict, where: str) -> Pair:
    """One row -> Pair; a bad row raises ValueError naming `where` (file:line) and the field."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for k in ("chosen", "rejected"):
        if k not in row:
            raise ValueError(f"{where}: missing field {k!r} (a pair needs chosen and rejected, and a prompt)")
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if prompt is None:  # implicit prompt: the shared leading messages
        if not (_messages(chosen) and _messages(rejected)):
            raise ValueError(f"{where}: missing field 'prompt' (without it, chosen and rejected must be conversations)")
        k = 0
        while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
            k += 1
        prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
        if not prompt:
            raise ValueError(f"{where}: chosen and rejected share no leading messages, so there is no prompt")
    if isinstance(prompt, str):
        for k, v in (("chosen", chosen), ("rejected", rejected)):
            if not isinstance(v, str):
                raise ValueError(f"{where}: field {k!r}: the prompt is a string, so it must be a string too")
    else:
        for k, v in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
            if not _messages(v) or not v:
                raise ValueError(f"{where}: field {k!r}: expected a non-empty list of {{role, content}} messages")
        for k, v in (("chosen", chosen), ("rejected", rejected)):
            if any(m["role"] != "assistant" for m in v):
                raise ValueError(f"{where}: field {k!r}: the completion must be assistant messages")
    if chosen == rejected:
        raise ValueError(f"{where}: chosen and rejected are the same (such a pair teaches nothing; drop it)")
    meta = {k: v for k, v in row.items() if k not in ("id", "prompt", "chosen", "rejected")}
    return Pair(str(row.get("id", where)), prompt, chosen, rejected, meta)


def read_pairs(path: str | Path) -> list[Pair]:
    """Every pair of a JSONL file; a bad line stops with one line naming file:line and the field."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"dpo.path: no such file: {p}")
    out = [parse_pair(row, where) for where, row in iter_jsonl(p)]  # file:line errors: bad JSON, not UTF-8
    if not out:
        raise ValueError(f"{p}: no pairs (the file is empty)")
    return out


def write_pairs(path: str | Path, pairs: list[Pair]) -> None:
    with Path(path).open("w") as f:
        for q in pairs:
            f.write(json.dumps({"id": q.id, "prompt": q.prompt, "chosen": q.chosen, "rejected": q.rejected, **q.meta}) + "\n")


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def encode_pair(tokenizer, pair: Pair) -> PairTokens:
    """Token ids of the prompt and of each completion, as TRL's DPOTrainer makes them."""
    if isinstance(pair.prompt, str):
        eos = tokenizer.eos_token or ""
        enc = lambda s: list(tokenizer(s)["input_ids"])  # noqa: E731
        c = pair.chosen if pair.chosen.endswith(eos) else pair.chosen + eos
        r = pair.rejected if pair.rejected.endswith(eos) else pair.rejected + eos
        prompt, full_c, full_r = enc(pair.prompt), enc(pair.prompt + c), enc(pair.prompt + r)
    else:
        tpl = lambda m, **kw: list(tokenizer.apply_chat_template(m, tokenize=True, return_dict=True, **kw)["input_ids"])  # noqa: E731
        prompt = tpl(pair.prompt, add_generation_prompt=True)
        full_c, full_r = tpl(pair.prompt + pair.chosen), tpl(pair.prompt + pair.rejected)
    n = min(_common_prefix(prompt, full_c), _common_prefix(prompt, full_r))
    return PairTokens(prompt[:n], full_c[n:], full_r[n:])
