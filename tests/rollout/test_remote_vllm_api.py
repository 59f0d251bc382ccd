"""RemoteEngine's vLLM weight-sync path against a stand-in that answers like vLLM 0.32 (dev mode) on 127.0.0.1.

The real server is exercised by the opt-in tests/rollout/test_vllm_real.py; this one runs everywhere and pins the
requests the client sends: which endpoints, in which order, with which arguments.
"""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from thinkrl.rollout.remote import RemoteEngine, RemoteError
from thinkrl.types import SamplingParams

VLLM_ONLY = {"/pause", "/resume", "/collective_rpc", "/reset_prefix_cache", "/update_weight_version"}


class FakeVLLM:
    def __init__(self, dev_mode=True):
        self.calls, self.dev_mode, self.weights = [], dev_mode, "init"
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def answer(self, status, obj):
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path == "/v1/models":
                    return self.answer(200, {"object": "list", "data": [{"id": "micro", "owned_by": "vllm"}]})
                self.answer(404, {"detail": "Not Found"})

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n) or b"{}")
                path = self.path.split("?")[0]
                if path == "/v1/completions":
                    toks = [7, 8, 9][: body["max_tokens"]]
                    choice = {"index": 0, "text": "", "finish_reason": "length", "token_ids": toks,
                              "logprobs": {"token_logprobs": [-0.5] * len(toks),
                                           "tokens": [f"token_id:{t}" for t in toks]}}
                    return self.answer(200, {"choices": [dict(choice, index=i) for i in range(body["n"])]})
                if path not in VLLM_ONLY or not fake.dev_mode:
                    return self.answer(404, {"detail": "Not Found"})
                fake.calls.append((self.path, body))
                if path == "/collective_rpc":
                    fake.weights = body["kwargs"]["weights_path"]
                    return self.answer(200, {"results": [None]})
                self.answer(200, {"success": True} if path == "/reset_prefix_cache" else {"status": "ok"})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake():
    f = FakeVLLM()
    yield f
    f.close()


@pytest.mark.parametrize("mode,pause,reset", [("abort", "/pause?mode=abort", "/reset_prefix_cache"),
                                              ("in_place", "/pause?mode=keep", "/reset_prefix_cache"),
                                              ("retract", "/pause?mode=keep",
                                               "/reset_prefix_cache?reset_running_requests=true")])
def test_update_weights_uses_vllm_dev_endpoints(fake, tmp_path, mode, pause, reset):
    remote = RemoteEngine([fake.url], api="openai", pause_mode=mode)
    remote.load_weights(str(tmp_path), 3)
    assert [c[0] for c in fake.calls] == [pause, "/collective_rpc", reset, "/update_weight_version", "/resume"]
    assert fake.calls[1][1] == {"method": "reload_weights", "kwargs": {"weights_path": str(tmp_path)}}
    assert fake.calls[3][1] == {"new_version": "3"}
    assert remote.version == 3 and remote.servers[0].version == 3 and remote.servers[0].control == "vllm"
    g = remote.generate_batch([[1, 2]], SamplingParams(max_new_tokens=3))[0][0]
    assert g.tokens == [7, 8, 9] and g.versions == [3, 3, 3]
    fake.calls.clear()
    remote.pause()
    remote.resume()
    assert [c[0] for c in fake.calls] == [pause, "/resume"]


def test_missing_path_is_not_sent_and_catch_up(fake, tmp_path):
    remote = RemoteEngine([fake.url], api="openai")
    with pytest.raises(RemoteError, match="no such file"):
        remote.load_weights(str(tmp_path / "missing"), 1)
    assert fake.weights == "init" and [c[0] for c in fake.calls] == ["/pause?mode=abort", "/resume"]
    assert remote.version == 0
    # a server that missed an update (as if it was down) is brought up to date before its next request
    remote.version, remote._weights = 2, str(tmp_path)
    fake.calls.clear()
    g = remote.generate_batch([[1]], SamplingParams(max_new_tokens=2), n=2)[0]
    assert [x.versions for x in g] == [[2, 2], [2, 2]] and fake.weights == str(tmp_path)
    assert [c[0] for c in fake.calls] == ["/pause?mode=abort", "/collective_rpc", "/reset_prefix_cache",
                                          "/update_weight_version", "/resume"]


def test_vllm_without_dev_mode_says_so(tmp_path):
    f = FakeVLLM(dev_mode=False)
    try:
        remote = RemoteEngine([f.url], api="openai")
        assert remote.generate_batch([[1]], SamplingParams(max_new_tokens=1))[0][0].tokens == [7]
        with pytest.raises(RemoteError, match="VLLM_SERVER_DEV_MODE=1"):
            remote.load_weights(str(tmp_path), 1)
        sglang = RemoteEngine([f.url], api="sglang")  # the SGLang API never falls back to vLLM's endpoints
        with pytest.raises(RemoteError, match="/pause_generation: not found"):
            sglang.load_weights(str(tmp_path), 1)
    finally:
        f.close()
