"""A small HTTP/1.1 layer over asyncio streams (standard library only): enough for JSON APIs.

Server side: `read_request` / `write_response` (Content-Length bodies, keep-alive, `Expect: 100-continue`).
Client side: `HTTPClient`, a keep-alive connection pool bound to one event loop.
No chunked bodies; TLS on the client side only (https:// server URLs). Responses without a length run to EOF.
"""
from __future__ import annotations

import asyncio
import json
import ssl
from dataclasses import dataclass, field
from urllib.parse import urlsplit

REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
           411: "Length Required", 413: "Payload Too Large", 415: "Unsupported Media Type",
           431: "Request Header Fields Too Large", 500: "Internal Server Error", 503: "Service Unavailable"}
MAX_HEADER_BYTES = 64 * 1024


class HTTPError(Exception):
    """An error with an HTTP status; servers turn it into a JSON error response."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type


@dataclass
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes = b""
    keep_alive: bool = True

    def json(self):
        """The body parsed as JSON (an empty body is {}); malformed JSON is a 400."""
        if not self.body.strip():
            return {}
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError) as e:
            raise HTTPError(400, f"malformed JSON body: {e}") from None


async def _read_head(reader: asyncio.StreamReader) -> list[str] | None:
    """The start line and header lines of one message; None at a clean end of stream."""
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        if not e.partial.strip():
            return None
        raise HTTPError(400, "incomplete HTTP message") from None
    except asyncio.LimitOverrunError:
        raise HTTPError(431, "HTTP headers too large") from None
    if len(raw) > MAX_HEADER_BYTES:
        raise HTTPError(431, "HTTP headers too large")
    return raw.decode("latin-1").split("\r\n")[:-2]


def _parse_headers(lines: list[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise HTTPError(400, f"malformed header line {line[:60]!r}")
        headers[name.strip().lower()] = value.strip()
    return headers


async def read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_body: int) -> Request | None:
    """Read one request (None when the client closed the connection between requests)."""
    lines = await _read_head(reader)
    if lines is None:
        return None
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HTTPError(400, f"malformed request line {lines[0][:80]!r}")
    method, target, version = parts
    headers = _parse_headers(lines[1:])
    conn = headers.get("connection", "").lower()
    keep_alive = conn != "close" if version == "HTTP/1.1" else conn == "keep-alive"
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise HTTPError(411, "chunked request bodies are not supported; send Content-Length")
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise HTTPError(400, "malformed Content-Length") from None
    if length < 0:
        raise HTTPError(400, "malformed Content-Length")
    if length > max_body:
        raise HTTPError(413, f"request body of {length} bytes exceeds the limit of {max_body} bytes")
    if length and headers.get("expect", "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
    try:
        body = await reader.readexactly(length) if length else b""
    except asyncio.IncompleteReadError:
        raise HTTPError(400, "request body shorter than Content-Length") from None
    path, _, query = target.partition("?")
    return Request(method.upper(), path, query, headers, body, keep_alive)


def json_bytes(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


async def write_response(writer: asyncio.StreamWriter, status: int, body: bytes = b"",
                         content_type: str = "application/json", keep_alive: bool = True,
                         headers: dict[str, str] | None = None) -> None:
    head = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}", f"Content-Length: {len(body)}",
            f"Connection: {'keep-alive' if keep_alive else 'close'}"]
    if body or content_type != "application/json":
        head.append(f"Content-Type: {content_type}")
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
    await writer.drain()


# ---------------------------------------------------------------------------------------------- client
@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body) if self.body.strip() else None

    def error_message(self) -> str:
        """The server's error message: OpenAI style {"error": {"message"}}, SGLang style {"message"}, or text."""
        try:
            obj = self.json()
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            err = obj.get("error")
            if isinstance(err, dict) and "message" in err:
                return str(err["message"])
            if isinstance(err, str):
                return err
            if "message" in obj:
                return str(obj["message"])
        return self.body[:300].decode("utf-8", "replace")


@dataclass
class HTTPClient:
    """Keep-alive connections per (host, port), bound to the event loop that first uses it.

    Connection failures raise OSError (ConnectionError, incomplete reads included); callers decide
    about retries. A request on a reused idle connection that the server had closed is retried once
    on a fresh connection, since nothing was processed.
    """

    headers: dict[str, str] = field(default_factory=dict)
    max_idle: int = 64
    _idle: dict[tuple[str, int], list] = field(default_factory=dict)

    async def request(self, method: str, url: str, json_body=None, timeout: float | None = None,
                      headers: dict[str, str] | None = None) -> Response:
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"server URL {url!r}: expected http://host:port or https://host:port")
        key = (u.hostname, u.port or (443 if u.scheme == "https" else 80), u.scheme == "https")
        target = (u.path or "/") + (f"?{u.query}" if u.query else "")
        body = json_bytes(json_body) if json_body is not None else b""
        head = [f"{method} {target} HTTP/1.1", f"Host: {u.netloc}", f"Content-Length: {len(body)}",
                "Connection: keep-alive"]
        if json_body is not None:
            head.append("Content-Type: application/json")
        head += [f"{k}: {v}" for k, v in {**self.headers, **(headers or {})}.items()]
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        coro = self._send(key, data, method)
        return await (asyncio.wait_for(coro, timeout) if timeout else coro)

    async def _send(self, key, data: bytes, method: str) -> Response:
        while self._idle.get(key):
            reader, writer = self._idle[key].pop()
            try:
                return await self._exchange(key, reader, writer, data, method)
            except (ConnectionError, asyncio.IncompleteReadError, _StaleConnection):
                writer.close()  # the server closed this idle connection; try the next or a new one
        ctx = ssl.create_default_context() if key[2] else None
        reader, writer = await asyncio.open_connection(key[0], key[1], ssl=ctx, limit=2 ** 24)
        try:
            return await self._exchange(key, reader, writer, data, method)
        except _StaleConnection as e:
            raise ConnectionResetError(str(e)) from None

    async def _exchange(self, key, reader, writer, data: bytes, method: str) -> Response:
        ok = False
        try:
            writer.write(data)
            await writer.drain()
            try:
                lines = await _read_head(reader)
            except HTTPError as e:
                raise ConnectionResetError(f"bad response from {key[0]}:{key[1]}: {e.message}") from None
            if lines is None:
                raise _StaleConnection(f"{key[0]}:{key[1]} closed the connection without a response")
            parts = lines[0].split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
                raise ConnectionResetError(f"bad status line from {key[0]}:{key[1]}: {lines[0][:80]!r}")
            status = int(parts[1])
            hdrs = _parse_headers(lines[1:])
            if "content-length" in hdrs:
                try:
                    body = await reader.readexactly(int(hdrs["content-length"]))
                except asyncio.IncompleteReadError:
                    raise ConnectionResetError(f"{key[0]}:{key[1]} closed the connection mid-response") from None
            elif method == "HEAD" or status in (204, 304):
                body = b""
            else:  # no length: the body runs to the end of the stream
                body = await reader.read()
                hdrs["connection"] = "close"
            ok = True
            resp = Response(status, hdrs, body)
        finally:
            if not ok:
                writer.close()
        if hdrs.get("connection", "").lower() == "close" or len(self._idle.get(key, [])) >= self.max_idle:
            writer.close()
        else:
            self._idle.setdefault(key, []).append((reader, writer))
        return resp

    def close(self) -> None:
        for conns in self._idle.values():
            for _, writer in conns:
                try:
                    writer.close()
                except RuntimeError:  # its event loop is already closed
                    pass
        self._idle.clear()


class _StaleConnection(Exception):
    pass


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
            raise HTTPError(400, f"{name}: required field is missing")
        return default
    ok = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          "bool": lambda v: isinstance(v, bool), "str": lambda v: isinstance(v, str),
          "dict": lambda v: isinstance(v, dict), "list": lambda v: isinstance(v, list)}[kind](val)
    if not ok:
        raise HTTPError(400, f"{name}: expected {kind}, got {type(val).__name__}")
    if (lo is not None and val < lo) or (hi is not None and val > hi):
        rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise HTTPError(400, f"{name}: {val!r} is out of range {rng}")
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
    raise HTTPError(400, f"{where}{key}: expected a string or a list of strings")


def get_id_lists(val, name: str) -> tuple[list[list[int]], bool]:
    """Token ids as (list of prompts, was it a batch): [ids] -> ([ids], False); [[ids], ...] -> (.., True)."""
    def ids(v):
        if not isinstance(v, list) or not v or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            raise HTTPError(400, f"{name}: expected a non-empty list of token ids (ints)")
        return v

    if isinstance(val, list) and val and isinstance(val[0], list):
        return [ids(v) for v in val], True
    return [ids(val)], False


# ---------------------------------------------------------------------------- sampling keys (server side)
# sampling keys we accept only at their neutral value (any other value changes sampling: refuse it)
NEUTRAL = {"min_new_tokens": 0, "min_tokens": 0, "frequency_penalty": 0, "presence_penalty": 0,
           "repetition_penalty": 1, "min_p": 0, "ignore_eos": False, "logit_bias": {}, "json_schema": None,
           "regex": None, "ebnf": None, "custom_params": None, "echo": False, "suffix": None,
           "top_logprobs_num": 0, "token_ids_logprob": None, "lora_path": None, "custom_logit_processor": None}
IGNORED = {"skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim", "include_stop_str_in_output",
           "user", "stream_options", "model", "return_text_in_logprobs", "logprob_start_len", "rid", "stream",
           "return_logprob", "text", "input_ids", "sampling_params", "return_tokens_as_token_ids",
           "return_token_ids", "seed", "sampling_seed", "n", "best_of"}


def check_neutral(d: dict, where: str = "") -> None:
    for k, neutral in NEUTRAL.items():
        v = d.get(k)
        if v is not None and v != neutral:
            raise HTTPError(400, f"{where}{k}={v!r} is not supported by thinkrl engines")
