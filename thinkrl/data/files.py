"""Chat-format data files: SFT conversations and generation files (``thinkrl generate`` output), read with
one-line errors naming file:line and the field.

    convs = load_conversations("distilled.jsonl")    # [(file:line, messages)]: rows with `messages`, or prompt + response
    rows = read_generations("gen.jsonl")                          # rows of `thinkrl generate`, a torn last line dropped

An SFT row is either ``{"messages": [{"role", "content"}, ...]}`` (loss on every assistant turn) or
``{"prompt": "...", "response": "..."}`` (one user and one assistant message); the field names are
``data.sft_messages_field`` / ``sft_prompt_field`` / ``sft_response_field``. Which kind a file holds is decided
by its first row. Files are .jsonl, .json, .parquet or a Hugging Face ``datasets`` directory
(thinkrl.data.datasets.iter_rows).

A generation row (one kept answer) is ``id``, ``sample`` (int; ``id`` + ``sample`` unique), ``messages`` (the
prompt's messages + ``{"role": "assistant", "content": answer}``), ``reward`` (float, or null without a
verifier) and ``model`` (the name or path of the model that answered).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from thinkrl.data.chat import ROLES
from thinkrl.data.datasets import DataError, get_field, iter_rows

log = logging.getLogger("thinkrl")


def check_messages(where: str, field: str, msgs: Any, need_assistant: bool = True) -> list[dict]:
    """`msgs` as a list of {"role", "content"} dicts (copies with those two keys), else DataError naming `where`."""
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: field {field!r} must be a non-empty list of {{'role', 'content'}} messages, "
                        f"got {type(msgs).__name__ if not isinstance(msgs, list) else 'an empty list'}")
    out = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: field '{field}.{j}' must be an object with a string 'content'")
        if m.get("role") not in ROLES:
            raise DataError(f"{where}: field '{field}.{j}.role' is {m.get('role')!r}; valid: {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: field {field!r} has no assistant message (nothing to train on)")
    return out


def _string(where: str, row: dict, field: str) -> str:
    try:
        v = get_field(row, field)
    except KeyError:
        raise DataError(f"{where}: field {field!r} missing") from None
    if not isinstance(v, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {type(v).__name__}")
    return v


def load_conversations(path: str | Path, messages_field: str = "messages", prompt_field: str = "prompt",
                       response_field: str = "response") -> list[tuple[str, list[dict]]]:
    """(file:line, messages) of each conversation of an SFT file, in file order (see the module docstring)."""
    convs: list[tuple[str, list[dict]]] = []
    kind = None
    for where, row in iter_rows(path):
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        if kind is None:
            kind = "messages" if get_field(row, messages_field, None) is not None else "prompt"
            if kind == "prompt" and get_field(row, prompt_field, None) is None:
                raise DataError(f"{where}: field {messages_field!r} missing (or {prompt_field!r} + "
                                f"{response_field!r}); set data.sft_messages_field or data.sft_prompt_field")
        if kind == "messages":
            try:
                msgs = get_field(row, messages_field)
            except KeyError:
                raise DataError(f"{where}: field {messages_field!r} missing") from None
            convs.append((where, check_messages(where, messages_field, msgs)))
        else:
            convs.append((where, [{"role": "user", "content": _string(where, row, prompt_field)},
                                  {"role": "assistant", "content": _string(where, row, response_field)}]))
    if not convs:
        raise DataError(f"{path}: no rows")
    return convs


def write_conversations(path: str | Path, conversations: list[list[dict]], field: str = "messages") -> Path:
    """`conversations` as a chat-format JSONL file (one ``{field: messages}`` row each), written atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for msgs in conversations:
            f.write(json.dumps({field: msgs}) + "\n")
    tmp.replace(p)
    return p


# ----------------------------------------------------------------------------- generation files


def read_jsonl_rows(path: str | Path, repair: bool = False) -> list[tuple[str, dict]]:
    """(file:line, row) of a JSONL file that a writer appends to. A last line without its newline (a write cut off
    by a kill) is dropped with a warning, and with `repair` cut from the file, so appending continues cleanly; a
    bad line elsewhere is a DataError naming it. A missing file has no rows."""
    p = Path(path)
    if not p.exists():
        return []
    data = p.read_bytes()
    keep = len(data)
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        n = data.count(b"\n") + 1
        log.warning("%s:%d: a partly written last line (%d bytes) dropped", p, n, len(data) - keep)
        if repair:
            with p.open("r+b") as f:
                f.truncate(keep)
    rows = []
    for i, raw in enumerate(data[:keep].split(b"\n")[:-1] if keep else [], 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{p}:{i}: not valid JSON ({getattr(e, 'msg', e)})") from None
        if not isinstance(row, dict):
            raise DataError(f"{p}:{i}: expected a JSON object, got {type(row).__name__}")
        rows.append((f"{p}:{i}", row))
    return rows


def check_generation(where: str, row: dict) -> dict:
    """A generation row with its fields checked (see the module docstring); DataError naming the field."""
    for f in ("id", "sample", "messages", "reward", "model"):
        if f not in row:
            raise DataError(f"{where}: field {f!r} missing (a `thinkrl generate` row has id, sample, messages, "
                            "reward, model)")
    if not isinstance(row["id"], (str, int)) or isinstance(row["id"], bool):
        raise DataError(f"{where}: field 'id' must be a string or an integer")
    if not isinstance(row["sample"], int) or isinstance(row["sample"], bool):
        raise DataError(f"{where}: field 'sample' must be an integer")
    msgs = check_messages(where, "messages", row["messages"])
    if msgs[-1]["role"] != "assistant":
        raise DataError(f"{where}: field 'messages' must end with the assistant's answer")
    r = row["reward"]
    if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float))):
        raise DataError(f"{where}: field 'reward' must be a number or null")
    return {**row, "id": str(row["id"]), "messages": msgs}


def read_generations(path: str | Path) -> list[dict]:
    """The checked rows of a generation file (each with its ``where``); DataError if it has none."""
    if not Path(path).is_file():
        raise DataError(f"generation file not found: {path}")
    rows = [dict(check_generation(w, r), where=w) for w, r in read_jsonl_rows(path)]
    if not rows:
        raise DataError(f"{path}: no rows")
    seen: dict[tuple[str, int], str] = {}
    for r in rows:
        key = (r["id"], r["sample"])
        if key in seen:
            raise DataError(f"{r['where']}: id {r['id']!r} sample {r['sample']} again (first at {seen[key]})")
        seen[key] = r["where"]
    return rows
