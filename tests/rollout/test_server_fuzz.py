"""Fuzzing thinkrl serve (hypothesis): malformed, oversized, wrong-typed and deeply nested bodies, odd headers and
wrong methods on every route. Each answer is a 2xx or a 4xx with a JSON error body, never a 5xx or a dropped
connection, and the server is healthy after. The fast version sends ~150 requests; the slow one ~2,000."""
from __future__ import annotations

import json
import socket

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from thinkrl.models.micro import build_micro_model, build_tokenizer
from thinkrl.rollout.engine import EmbeddedEngine
from thinkrl.rollout.server import ROUTES, Server

pytestmark = pytest.mark.usefixtures("one_thread")
TOK = build_tokenizer()
PROMPT = TOK.encode("1+2")
MAX_BODY = 32 * 1024
SENT = {"requests": 0, "by_status": {}}  # what the fuzzers sent (the report quotes it)

# values: mostly plausible ones (so that requests reach deep into the handlers), then anything JSON can hold
ints = st.integers(-3, 70) | st.sampled_from([2 ** 31, 2 ** 63, -(2 ** 63) - 1, 10 ** 20, 0])
leaf = (st.none() | st.booleans() | ints | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=12) | st.sampled_from(["abort", "in_place", "retract", "keep", "", "micro"]))
anything = st.recursive(leaf, lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(max_size=8), ch,
                                                                                  max_size=4), max_leaves=10)
ids = st.lists(st.integers(-2, TOK.vocab_size + 2), max_size=8) | st.just(PROMPT)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", 3]),
                                           "content": st.text(max_size=10) | anything}), max_size=3)
value = {"text": st.text(max_size=10) | st.lists(st.text(max_size=5), max_size=3), "input_ids": ids,
         "prompt": ids | st.text(max_size=10), "messages": messages, "mode": leaf, "model_path": leaf,
         "weight_version": leaf, "stream_options": st.fixed_dictionaries({}, optional={"include_usage": leaf})}
sampling_keys = ["max_new_tokens", "temperature", "top_p", "top_k", "n", "stop", "stop_token_ids", "seed",
                 "sampling_seed", "ignore_eos", "min_p", "no_stop_trim", "frobnicate"]
sampling = st.fixed_dictionaries({}, optional={k: leaf for k in sampling_keys}) | anything
top_keys = ["max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n", "best_of", "logprobs",
            "top_logprobs", "stream", "stop", "stop_token_ids", "seed", "echo", "return_logprob",
            "top_logprobs_num", "return_text_in_logprobs", "return_tokens_as_token_ids", "return_token_ids", "rid",
            "skip_special_tokens", "include_stop_str_in_output", "load_format", "abort_all_requests", "model",
            "prompt_logprobs", "logprob_start_len"]
body = st.fixed_dictionaries({}, optional={**{k: leaf for k in top_keys}, **value, "sampling_params": sampling})
HOSTILE = [b"NaN", b'{"temperature": Infinity}', b'{"sampling_params": {"top_p": 1e999}}', b"[]", b"null", b'"x"',
           b'{"input_ids": [' + b"9" * 5000 + b"]}", b"\xff\xfe{}", b'{"input_ids": ' + b"[" * 15000 + b"]" * 15000 + b"}",
           b'{"messages": ' + b'[{"content": ' * 3000 + b"1" + b"}]" * 3000 + b"}", b"{" * 20000,
           b'{"text": "' + b"a" * (MAX_BODY + 1) + b'"}', b'{"max_tokens": 1e308, "prompt": "a"}',
           b'{"prompt": [1, 2], "seed": 100000000000000000000000}', b'{"input_ids": [1], "rid": [1, 2]}']
raw = (st.binary(max_size=64)
       | st.integers(1000, 15000).map(lambda d: b'{"input_ids": ' + b"[" * d + b"]" * d + b"}")  # deep nesting
       | st.integers(MAX_BODY + 1, 2 * MAX_BODY).map(lambda n: b'{"text": "' + b"a" * n + b'"}')  # oversized
       | st.sampled_from(HOSTILE))
paths = st.sampled_from(sorted(ROUTES) + ["/openapi.json", "/nope", "/v1/nope", "/generate/", "//generate"])
methods = st.sampled_from(["POST"] * 6 + ["GET"] * 2 + ["PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
headers = st.fixed_dictionaries({}, optional={
    "content-type": st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", "",
                                     "multipart/form-data; boundary=x"]),
    "authorization": st.sampled_from(["Bearer x", "Basic abc", "Bearer", ""]),
    "accept": st.sampled_from(["*/*", "text/event-stream", "application/xml"]),
    "x-junk": st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=40)})


@pytest.fixture(scope="module")
def server():
    model = build_micro_model(TOK, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                              max_position=32, seed=0).eval()
    srv = Server(EmbeddedEngine(model, tokenizer=TOK, max_seqs=8), TOK, model=model, port=0, max_body=MAX_BODY)
    port = srv.start()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60, trust_env=False) as client:
        yield srv, port, client
    srv.stop()
    srv.engine.close()


def send(client, method, path, content, hdrs):
    r = client.request(method, path, content=content, headers=hdrs)  # a dropped connection raises here
    SENT["requests"] += 1
    SENT["by_status"][r.status_code] = SENT["by_status"].get(r.status_code, 0) + 1
    assert r.status_code < 500, (method, path, content[:200], r.status_code, r.text[:300])
    if r.status_code >= 400 and method != "HEAD":
        err = r.json()["error"]  # a JSON error naming what was wrong
        assert err["code"] == r.status_code and err["message"]
    if path == "/pause_generation" and r.status_code == 200:  # a paused server holds later generate calls
        assert client.post("/continue_generation").status_code == 200
    return r


def fuzz(n):
    @settings(max_examples=n, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                     HealthCheck.data_too_large])
    @given(path=paths, method=methods, payload=body | raw, hdrs=headers)
    def run(server, path, method, payload, hdrs):
        _, _, client = server
        content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        send(client, method, path, content, hdrs)
    return run


test_fuzz_every_route = fuzz(120)
test_fuzz_every_route_long = pytest.mark.slow(fuzz(2000))


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/generate"]), payload=body)
def test_fuzz_generation_routes(server, path, payload):
    """Well-formed JSON objects with fuzzed fields on the generation routes: deeper into the validation."""
    _, _, client = server
    send(client, "POST", path, json.dumps(payload).encode(), {"content-type": "application/json"})


def test_hostile_bodies_on_every_post_route(server):
    """Every hostile body on every POST route, exhaustively: a 4xx JSON error or a 200 (a route that reads no
    body), never a 5xx."""
    _, _, client = server
    for path in sorted(p for p, (methods, _) in ROUTES.items() if "POST" in methods):
        for content in HOSTILE:
            send(client, "POST", path, content, {"content-type": "application/json"})


def test_protocol_garbage_and_healthy_after(server):
    """Bytes that are not HTTP get a 4xx from the HTTP layer (uvicorn's text answer), not a crash; and after all
    the fuzzing the server still generates."""
    srv, port, client = server
    for junk in (b"HELLO\r\n\r\n", b"POST /generate HTTP/1.1\r\nContent-Length: nope\r\n\r\n",
                 b"POST /generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                 b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * 70000 + b"\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(junk)
            reply = s.recv(4096)
        assert reply == b"" or reply.startswith(b"HTTP/1.1 4"), reply[:80]
    r = client.post("/generate", json={"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 4}})
    assert r.status_code == 200 and len(r.json()["output_ids"]) >= 1
    assert client.get("/health").status_code == 200 and srv.queued == 0
    print(f"\nfuzz: {SENT['requests']} requests, statuses {dict(sorted(SENT['by_status'].items()))}")
