"""Request-field checks of `thinkrl serve`: each bad field is a 4xx naming it (`APIError`), never a 500.

The server reads bodies itself (rollout/server.py `read_json`) and checks fields here, so that its messages name
the field the way SGLang and vLLM clients expect ("sampling_params.max_new_tokens: expected int, got str").
"""
from __future__ import annotations

import json
import math

INT64 = (-(1 << 63), (1 << 63) - 1)


class APIError(Exception):
    """An error with an HTTP status; the server answers it as JSON {"error": {"message", "type", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.headers = status, message, type, headers or {}

    def payload(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.status}}


def _finite(s: str) -> float:
    v = float(s)
    if not math.isfinite(v):
        raise ValueError(f"number {s[:20]} is out of range")
    return v


def _no_constant(s: str):
    raise ValueError(f"{s} is not valid JSON")


def parse_json(body: bytes):
    """The body parsed as JSON (an empty body is {}); malformed, non-finite or too deeply nested JSON is a 400."""
    if not body.strip():
        return {}
    try:
        return json.loads(body, parse_float=_finite, parse_constant=_no_constant)
    except RecursionError:
        raise APIError(400, "malformed JSON body: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:  # (also ints over Python's digit limit)
        raise APIError(400, f"malformed JSON body: {e}") from None


# ---------------------------------------------------------------------------------------------- JSON fields
_MISSING = object()


def get_field(obj: dict, key: str, kind: str, default=_MISSING, *, lo=None, hi=None, where: str = ""):
    """obj[key] checked against kind ("int" | "float" | "bool" | "str" | "dict" | "list"), else a 400 naming it.

    None counts as missing. Bounds `lo`/`hi` are inclusive.
    """
    name = f"{where}{key}"
    val = obj.get(key)
    if val is None:
        if default is _MISSING:
            raise APIError(400, f"{name}: required field is missing")
        return default
    ok = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          "bool": lambda v: isinstance(v, bool), "str": lambda v: isinstance(v, str),
          "dict": lambda v: isinstance(v, dict), "list": lambda v: isinstance(v, list)}[kind](val)
    if not ok:
        raise APIError(400, f"{name}: expected {kind}, got {type(val).__name__}")
    if kind in ("int", "float") and not -1e300 < val < 1e300:  # (an int too big for a float)
        raise APIError(400, f"{name}: {val!r} is out of range")
    if (lo is not None and val < lo) or (hi is not None and val > hi):
        rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise APIError(400, f"{name}: {val!r} is out of range {rng}")
    return float(val) if kind == "float" else val


def get_str_list(obj: dict, key: str, where: str = "") -> list[str]:
    """A string or a list of strings (OpenAI `stop`), as a list; missing is []."""
    val = obj.get(key)
    if val is None:
        return []
    if isinstance(val, str):
        return [val]
    if isinstance(val, list) and all(isinstance(s, str) for s in val):
        return list(val)
    raise APIError(400, f"{where}{key}: expected a string or a list of strings")


def get_id_lists(val, name: str) -> tuple[list[list[int]], bool]:
    """Token ids as (list of prompts, was it a batch): [ids] -> ([ids], False); [[ids], ...] -> (.., True)."""
    def ids(v):
        if not isinstance(v, list) or not v or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            raise APIError(400, f"{name}: expected a non-empty list of token ids (ints)")
        return v

    if isinstance(val, list) and val and isinstance(val[0], list):
        return [ids(v) for v in val], True
    return [ids(val)], False


# ---------------------------------------------------------------------------- sampling keys (server side)
# sampling keys we accept only at their neutral value (any other value changes sampling: refuse it)
NEUTRAL = {"min_new_tokens": 0, "min_tokens": 0, "frequency_penalty": 0, "presence_penalty": 0,
           "repetition_penalty": 1, "min_p": 0, "ignore_eos": False, "logit_bias": {}, "json_schema": None,
           "regex": None, "ebnf": None, "custom_params": None, "suffix": None,
           "token_ids_logprob": None, "lora_path": None, "custom_logit_processor": None}
IGNORED = {"skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim", "include_stop_str_in_output",
           "user", "stream_options", "model", "return_text_in_logprobs", "logprob_start_len", "rid", "stream",
           "return_logprob", "text", "input_ids", "sampling_params", "return_tokens_as_token_ids",
           "return_token_ids", "seed", "sampling_seed", "n", "best_of"}


def check_neutral(d: dict, where: str = "") -> None:
    for k, neutral in NEUTRAL.items():
        v = d.get(k)
        if v is not None and v != neutral:
            raise APIError(400, f"{where}{k}={v!r} is not supported by thinkrl engines")
