"""thinkrl serve over real HTTP on 127.0.0.1: SGLang native API, OpenAI subset, errors, overload, auth, weights."""
import http.client
import json
import socket
import threading
import time

import pytest
import torch

from thinkrl.models.micro import build_micro_model, build_tokenizer
from thinkrl.rollout.engine import EmbeddedEngine
from thinkrl.rollout.hf import HFEngine
from thinkrl.rollout.server import Server

TOK = build_tokenizer()
PROMPT = TOK.apply_chat_template([{"role": "user", "content": "1+2"}], add_generation_prompt=True, tokenize=True,
                                 return_dict=True)["input_ids"]


def micro(seed=0, hidden=32):
    return build_micro_model(TOK, hidden_size=hidden, num_layers=2, num_heads=2, num_kv_heads=1,
                             intermediate_size=64, max_position=64, seed=seed).eval()


def make_engine(kind, model):
    if kind == "embedded":
        return EmbeddedEngine(model, tokenizer=TOK, max_seqs=8)
    return HFEngine(model, TOK)


def forward_logprobs(model, prompt, tokens):
    """Hand reference: teacher-forced log-probs (and the greedy choice) of `tokens` after `prompt`."""
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([prompt + tokens])).logits[0].float(), -1)
    rows = lp[len(prompt) - 1: len(prompt) - 1 + len(tokens)]
    return [rows[i, t].item() for i, t in enumerate(tokens)], rows.argmax(-1).tolist()


def call(port, path, body=None, method="POST", headers=None, raw=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    text = r.read()
    conn.close()
    try:
        return r.status, json.loads(text) if text else None
    except ValueError:
        return r.status, text.decode()


def shutdown(server):
    server.stop()
    if hasattr(server.engine, "close"):  # the embedded engine's worker thread
        server.engine.close()


def gen_body(max_new=8, **sp):
    return {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": max_new, "temperature": 0, **sp},
            "return_logprob": True}


@pytest.fixture(scope="module", params=["hf", "embedded"])
def served(request):
    model = micro()
    server = Server(make_engine(request.param, model), TOK, model=model, model_dir="ckpt/micro", port=0,
                    max_body=64 * 1024)
    port = server.start()
    yield server, port, model
    shutdown(server)


def wait_for(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.005)


def test_generate_greedy_logprobs_match_forward(served):
    server, port, model = served
    status, out = call(port, "/generate", gen_body(8))
    assert status == 200
    meta = out["meta_info"]
    toks = out["output_ids"]
    assert 1 <= len(toks) <= 8 and meta["completion_tokens"] == len(toks) and meta["prompt_tokens"] == len(PROMPT)
    assert meta["finish_reason"]["type"] == ("length" if len(toks) == 8 else "stop")
    assert [e[1] for e in meta["output_token_logprobs"]] == toks
    ref, greedy = forward_logprobs(model, PROMPT, toks)
    assert greedy == toks
    assert [e[0] for e in meta["output_token_logprobs"]] == pytest.approx(ref, abs=1e-4)
    assert meta["output_token_versions"] == [0] * len(toks) and meta["weight_version"] == "0"
    assert out["text"] == TOK.decode(toks, skip_special_tokens=True)


def test_generate_text_batch_with_n(served):
    _, port, _ = served
    status, out = call(port, "/generate", {"text": ["ab", "c"], "rid": ["r1", "r2"],
                                          "sampling_params": {"max_new_tokens": 3, "n": 2, "temperature": 1.0}})
    assert status == 200 and isinstance(out, list) and len(out) == 4
    assert [o["meta_info"]["id"] for o in out] == ["r1_0", "r1_1", "r2_0", "r2_1"]
    assert [o["meta_info"]["prompt_tokens"] for o in out] == [2, 2, 1, 1]
    assert all(1 <= len(o["output_ids"]) <= 3 and "output_token_logprobs" not in o["meta_info"] for o in out)


def test_info_endpoints_and_keep_alive(served):
    server, port, _ = served
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for path in ("/health", "/get_model_info", "/v1/models"):  # three requests on one connection
        conn.request("GET", path)
        r = conn.getresponse()
        body = r.read()
        assert r.status == 200, path
    conn.close()
    assert json.loads(body)["data"][0]["id"] == "micro"
    assert call(port, "/get_model_info", method="GET")[1]["model_path"] == "ckpt/micro"
    assert call(port, "/flush_cache")[0] == 200


@pytest.mark.parametrize("body,status,word", [
    (b"{not json", 400, "malformed JSON"),
    ({"sampling_params": {"max_new_tokens": 4}}, 400, "exactly one of text or input_ids"),
    ({"input_ids": [], "sampling_params": {}}, 400, "input_ids"),
    ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": "8"}}, 400, "max_new_tokens"),
    ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 500}}, 400, "context length (64)"),
    ({"input_ids": [1, 99999], "sampling_params": {}}, 400, "out of range"),
    ({"input_ids": [1, 2], "sampling_params": {"frobnicate": 1}}, 400, "frobnicate"),
    ({"input_ids": [1, 2], "sampling_params": {"ignore_eos": True}}, 400, "not supported"),
    ({"input_ids": [1, 2], "stream": "yes"}, 400, "stream"),
    ({"input_ids": [1, 2], "sampling_params": {"temperature": 1e999}}, 400, "malformed JSON"),
    (b'{"input_ids": ' + b"[" * 30000 + b"]" * 30000 + b"}", 400, "nested too deeply"),
    (b'{"input_ids": [' + b"1," * 40000 + b"1]}", 413, "exceeds the limit"),
])
def test_bad_requests_get_json_4xx(served, body, status, word):
    _, port, _ = served
    raw = body if isinstance(body, bytes) else None
    got, out = call(port, "/generate", None if raw else body, raw=raw)
    assert got == status
    assert out["error"]["code"] == status and word in out["error"]["message"] and out["error"]["type"]
    assert call(port, "/health", method="GET")[0] == 200  # still serving


def test_unknown_path_and_garbage_request_line(served):
    _, port, _ = served
    assert call(port, "/nope")[0] == 404
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"HELLO\r\n\r\n")
        reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 400")


def test_engine_exception_is_500_and_server_survives():
    model = micro()
    engine = HFEngine(model, TOK)
    server = Server(engine, TOK, model=model, port=0)
    port = server.start()
    try:
        real = engine.generate

        async def broken(*a, **k):
            raise RuntimeError("CUDA fell over")
        engine.generate = broken
        status, out = call(port, "/generate", gen_body(4))
        assert status == 500 and "CUDA fell over" in out["error"]["message"]
        engine.generate = real
        assert call(port, "/generate", gen_body(4))[0] == 200
    finally:
        shutdown(server)


def test_overload_answers_503_and_pause_holds_requests():
    model = micro()
    server = Server(HFEngine(model, TOK), TOK, model=model, port=0, max_queue=1)
    port = server.start()
    try:
        assert call(port, "/pause_generation", {"mode": "in_place"})[0] == 200
        first = {}
        t = threading.Thread(target=lambda: first.update(r=call(port, "/generate", gen_body(4))))
        t.start()
        wait_for(lambda: server.queued == 1)
        status, out = call(port, "/generate", gen_body(4))
        assert status == 503 and out["error"]["code"] == 503 and "max_queue=1" in out["error"]["message"]
        time.sleep(0.2)
        assert t.is_alive()  # held while paused
        assert call(port, "/continue_generation")[0] == 200
        t.join(timeout=20)
        assert first["r"][0] == 200 and len(first["r"][1]["output_ids"]) >= 1
    finally:
        shutdown(server)


def test_api_key_is_enforced():
    model = micro()
    server = Server(HFEngine(model, TOK), TOK, model=model, port=0, api_key="sekrit")
    port = server.start()
    try:
        assert call(port, "/generate", gen_body(2))[0] == 401
        status, out = call(port, "/v1/models", method="GET", headers={"Authorization": "Bearer wrong"})
        assert status == 401 and out["error"]["type"] == "authentication_error"
        assert call(port, "/generate", gen_body(2), headers={"Authorization": "Bearer sekrit"})[0] == 200
        assert call(port, "/health", method="GET")[0] == 200  # probes need no key
        from thinkrl.rollout.server import ROUTES
        for path, (methods, _) in ROUTES.items():  # every other route, and unknown ones, need it
            if not path.startswith("/health"):
                status, out = call(port, path, {}, method=methods[0])
                assert status == 401 and out["error"]["code"] == 401, path
        assert call(port, "/openapi.json", method="GET")[0] == 401 and call(port, "/nope")[0] == 401
    finally:
        shutdown(server)


def test_update_weights_from_disk(tmp_path):
    model, new = micro(seed=0), micro(seed=1)
    new.save_pretrained(tmp_path / "v7")  # tied embeddings: lm_head is not in the file
    micro(hidden=48).save_pretrained(tmp_path / "wrong")
    server = Server(HFEngine(model, TOK), TOK, model=model, port=0)
    port = server.start()
    try:
        before = call(port, "/generate", gen_body(6))[1]
        status, out = call(port, "/update_weights_from_disk", {"model_path": str(tmp_path / "wrong")})
        assert status == 400 and out["success"] is False and "shape" in out["message"]
        status, out = call(port, "/update_weights_from_disk", {"model_path": str(tmp_path / "nowhere")})
        assert status == 400 and "no such file" in out["error"]["message"]
        assert call(port, "/get_weight_version", method="GET")[1] == {"weight_version": "0"}
        status, out = call(port, "/update_weights_from_disk", {"model_path": str(tmp_path / "v7"),
                                                                "weight_version": "7"})
        assert status == 200 and out["success"] is True
        assert call(port, "/get_weight_version", method="GET")[1] == {"weight_version": "7"}
        after = call(port, "/generate", gen_body(6))[1]
        toks = after["output_ids"]
        ref, greedy = forward_logprobs(new, PROMPT, toks)  # now the seed-1 model's distribution
        assert greedy == toks
        assert [e[0] for e in after["meta_info"]["output_token_logprobs"]] == pytest.approx(ref, abs=1e-4)
        assert after["meta_info"]["output_token_versions"] == [7] * len(toks)
        assert [e[0] for e in before["meta_info"]["output_token_logprobs"]] != pytest.approx(
            [e[0] for e in after["meta_info"]["output_token_logprobs"]], abs=1e-3)
    finally:
        shutdown(server)


def test_pause_midsequence_then_new_weights_change_versions(tmp_path):
    """Embedded engine: pause at a token boundary, swap weights, continue: one sequence, two versions."""
    model = micro()
    micro(seed=1).save_pretrained(tmp_path / "v1")
    engine = EmbeddedEngine(model, tokenizer=TOK, max_seqs=4)
    server = Server(engine, TOK, model=model, port=0)
    port = server.start()
    try:
        mixed = None
        for attempt in range(5):  # bounded: the pause must land while the sequence is running
            box = {}
            body = gen_body(56, temperature=1.0, seed=attempt)
            t = threading.Thread(target=lambda: box.update(r=call(port, "/generate", body)))
            t.start()
            wait_for(lambda: engine.stats()["running"] > 0 or not t.is_alive())
            call(port, "/pause_generation", {"mode": "in_place"})
            call(port, "/update_weights_from_disk", {"model_path": str(tmp_path / "v1"),
                                                     "weight_version": str(attempt + 1)})
            call(port, "/continue_generation")
            t.join(timeout=20)
            vers = box["r"][1]["meta_info"]["output_token_versions"]
            assert vers == sorted(vers) and set(vers) <= {attempt, attempt + 1}
            if len(set(vers)) == 2:
                mixed = vers
                break
        assert mixed is not None, "the pause never landed mid-sequence"
    finally:
        shutdown(server)


def test_openai_endpoints_raw_http(served):
    _, port, model = served
    status, out = call(port, "/v1/completions", {"model": "micro", "prompt": PROMPT, "max_tokens": 5, "temperature": 0,
                                                 "logprobs": 0, "return_tokens_as_token_ids": True, "n": 2})
    assert status == 200 and out["object"] == "text_completion" and len(out["choices"]) == 2
    c = out["choices"][0]
    toks = [int(t.split(":")[1]) for t in c["logprobs"]["tokens"]]
    ref, greedy = forward_logprobs(model, PROMPT, toks)
    assert greedy == toks and c["logprobs"]["token_logprobs"] == pytest.approx(ref, abs=1e-4)
    assert out["usage"]["prompt_tokens"] == len(PROMPT) and c["finish_reason"] in ("stop", "length")
    chat = {"model": "micro", "messages": [{"role": "user", "content": "1+2"}], "max_tokens": 5, "temperature": 0,
            "logprobs": True}
    status, out = call(port, "/v1/chat/completions", chat)
    assert status == 200 and out["choices"][0]["message"]["role"] == "assistant"
    lp = out["choices"][0]["logprobs"]["content"]
    assert [e["logprob"] for e in lp] == pytest.approx(ref[: len(lp)], abs=1e-4)  # same prompt, same greedy path
    assert call(port, "/v1/completions", {"model": "m", "prompt": PROMPT, "logprobs": 21})[0] == 400
    assert call(port, "/v1/chat/completions", {"model": "m", "messages": "hi"})[0] == 400


def test_official_openai_client(served):
    openai = pytest.importorskip("openai")
    _, port, model = served
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=30)
    assert [m.id for m in client.models.list().data] == ["micro"]
    comp = client.completions.create(model="micro", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=0,
                                     extra_body={"return_tokens_as_token_ids": True})
    toks = [int(t.split(":")[1]) for t in comp.choices[0].logprobs.tokens]
    ref, _ = forward_logprobs(model, PROMPT, toks)
    assert comp.choices[0].logprobs.token_logprobs == pytest.approx(ref, abs=1e-4)
    chat = client.chat.completions.create(model="micro", messages=[{"role": "user", "content": "1+2"}], max_tokens=5,
                                          temperature=0, logprobs=True, n=2)
    assert len(chat.choices) == 2 and chat.usage.prompt_tokens == len(PROMPT)
    got = [e.logprob for e in chat.choices[0].logprobs.content]
    assert got == pytest.approx(ref[: len(got)], abs=1e-4)
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.completions.create(model="micro", prompt=PROMPT, max_tokens=1000)


def reference_top(model, prompt, tokens, n):
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([prompt + tokens])).logits[0].float(), -1)
    v, i = lp[len(prompt) - 1: len(prompt) - 1 + len(tokens)].topk(n, -1)
    return i.tolist(), v.tolist()


def test_top_logprobs_all_apis(served):
    """logprobs=N (completions), top_logprobs=N (chat), top_logprobs_num=N (SGLang): the model's N most likely."""
    _, port, model = served
    status, out = call(port, "/v1/completions", {"model": "micro", "prompt": PROMPT, "max_tokens": 5,
                                                 "temperature": 0, "logprobs": 3, "return_tokens_as_token_ids": True})
    assert status == 200
    lp = out["choices"][0]["logprobs"]
    toks = [int(t.split(":")[1]) for t in lp["tokens"]]
    ids, vals = reference_top(model, PROMPT, toks, 3)
    for k, top in enumerate(lp["top_logprobs"]):  # greedy: the sampled token is the most likely, so 3 entries
        assert top == pytest.approx({f"token_id:{i}": v for i, v in zip(ids[k], vals[k])}, abs=1e-4)
    chat = {"model": "micro", "messages": [{"role": "user", "content": "1+2"}], "max_tokens": 5, "temperature": 0,
            "logprobs": True, "top_logprobs": 2, "return_tokens_as_token_ids": True}
    status, out = call(port, "/v1/chat/completions", chat)
    content = out["choices"][0]["logprobs"]["content"]
    for k, e in enumerate(content):
        assert [a["token"] for a in e["top_logprobs"]] == [f"token_id:{i}" for i in ids[k][:2]]
        assert [a["logprob"] for a in e["top_logprobs"]] == pytest.approx(vals[k][:2], abs=1e-4)
    status, out = call(port, "/generate", {**gen_body(5), "top_logprobs_num": 2})
    top = out["meta_info"]["output_top_logprobs"]
    assert [[a[1] for a in t] for t in top] == [i[:2] for i in ids[: len(top)]]
    assert call(port, "/v1/chat/completions", {**chat, "logprobs": False})[0] == 400  # top_logprobs needs logprobs


def test_official_openai_client_streams(served):
    """The OpenAI SDK streams completions and chat (SSE chunks, then [DONE]); the pieces join to the
    non-streamed answer; include_usage adds the usage chunk; top-N log-probs arrive per chunk."""
    openai = pytest.importorskip("openai")
    server, port, model = served
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=30)
    args = dict(model="micro", prompt=PROMPT, max_tokens=6, temperature=0)
    whole = client.completions.create(**args)
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True},
                                            logprobs=2))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    per_chunk = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert sum(len(p.tokens) for p in per_chunk) == whole.usage.completion_tokens
    assert all(len(top) >= 2 for p in per_chunk for top in p.top_logprobs)
    if EmbeddedEngine is not None and isinstance(server.engine, EmbeddedEngine):  # it streams token by token
        assert len(per_chunk) == whole.usage.completion_tokens
    msgs = [{"role": "user", "content": "1+2"}]
    whole = client.chat.completions.create(model="micro", messages=msgs, max_tokens=6, temperature=0)
    chunks = list(client.chat.completions.create(model="micro", messages=msgs, max_tokens=6, temperature=0,
                                                 stream=True, logprobs=True, top_logprobs=3))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    tops = [c.choices[0].logprobs.content[0].top_logprobs for c in chunks if c.choices[0].logprobs]
    assert tops and all(len(t) == 3 for t in tops)


def test_streamed_text_holds_back_stop_strings(served):
    """A stop string met mid-stream: the streamed pieces join to the non-streamed (trimmed) text, and no piece
    sent ever shows part of the stop string."""
    _, port, _ = served
    base = {"model": "micro", "prompt": PROMPT, "max_tokens": 20, "temperature": 1.0, "seed": 1}
    full = call(port, "/v1/completions", base)[1]["choices"][0]["text"]
    if len(full) < 6:
        pytest.skip("the continuation is too short to cut")
    stop = full[3:5]
    want = call(port, "/v1/completions", {**base, "stop": [stop]})[1]["choices"][0]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps({**base, "stop": [stop], "stream": True}),
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    events = [line[6:] for line in r.read().decode().split("\n\n") if line.startswith("data: ")]
    conn.close()
    assert r.status == 200 and r.getheader("content-type").startswith("text/event-stream") and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    pieces = [c["choices"][0]["text"] for c in chunks]
    assert "".join(pieces) == want["text"] and stop not in "".join(pieces)
    assert chunks[-1]["choices"][0]["finish_reason"] == want["finish_reason"] == "stop"


def test_client_gone_mid_stream_frees_the_request():
    """A streaming client that disconnects after its first chunk: the server releases its queue place and the
    embedded engine drops the sequence (it does not generate the other ~480 tokens for nobody)."""
    model = build_micro_model(TOK, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
                              max_position=512, seed=0).eval()
    engine = EmbeddedEngine(model, tokenizer=TOK, max_seqs=4, stop_at_eos=False)
    server = Server(engine, TOK, model=model, port=0)
    port = server.start()
    try:
        body = {"model": "m", "prompt": PROMPT, "max_tokens": 480, "temperature": 1.0, "seed": 0, "stream": True}
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        data = json.dumps(body).encode()
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
        got = b""
        while b"data: {" not in got:
            got += s.recv(4096)
        call(port, "/pause_generation", {"mode": "in_place"})  # hold the engine while the client goes
        assert engine.stats()["running"] == 1 and engine.progress() < 480
        ticks = engine.runner.ticks  # decode steps so far
        s.close()
        wait_for(lambda: server.queued == 0)
        call(port, "/continue_generation")
        wait_for(lambda: engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0)
        assert engine.runner.ticks - ticks < 10  # dropped, not run on (to its eos, ~100 tokens later, here)
        assert call(port, "/generate", gen_body(3))[0] == 200
    finally:
        shutdown(server)
