"""Prompt scoring: the engines' score() (teacher-forced log-probs on the current weights) and the server routes that
expose it as SGLang (/generate, logprob_start_len, max_new_tokens 0) and vLLM (/v1/completions, prompt_logprobs,
echo) answer it, read back by RemoteEngine.score over both APIs."""
from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

from thinkrl.models.micro import build_micro_model, build_tokenizer
from thinkrl.rollout.base import EngineCaps, InferenceEngine
from thinkrl.rollout.engine import EmbeddedEngine
from thinkrl.rollout.hf import HFEngine
from thinkrl.rollout.remote import RemoteEngine, RemoteError
from thinkrl.rollout.server import Server
from thinkrl.types import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")
TOK = build_tokenizer()
SEQS = [TOK.encode(t) for t in ["a", "What is 2+3?", "The quick brown fox jumps", "<|user|>hi<|end|><|assistant|>"]]


def micro(seed=0):
    return build_micro_model(TOK, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
                             max_position=64, seed=seed).eval()


@torch.no_grad()
def reference(model, seq):
    lp = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), -1)
    return [0.0] + [lp[t - 1, seq[t]].item() for t in range(1, len(seq))]


@pytest.fixture(scope="module")
def served():
    """A thinkrl server over the embedded engine, and its model."""
    model = micro()
    engine = EmbeddedEngine(model, tokenizer=TOK, max_seqs=8)
    srv = Server(engine, TOK, model=model, port=0)
    port = srv.start()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60, trust_env=False) as client:
        yield model, f"http://127.0.0.1:{port}", client
    srv.stop()
    engine.close()


@pytest.mark.parametrize("kind", ["embedded", "embedded_hf_forward", "hf"])
def test_engine_score_is_the_teacher_forced_forward(kind):
    model = micro()
    eng = (HFEngine(model, TOK) if kind == "hf" else
           EmbeddedEngine(model, tokenizer=TOK, max_seqs=2, forward="hf" if kind.endswith("hf_forward") else "auto",
                          max_prefill_tokens=16))  # (chunks of 16 padded tokens: several forwards)
    assert eng.caps.score
    got = eng.score(SEQS)
    for seq, lp in zip(SEQS, got):
        assert len(lp) == len(seq) and lp[0] == 0.0 and lp == pytest.approx(reference(model, seq), abs=1e-5)
    with pytest.raises(ValueError, match="sequence 1 has 0 tokens"):
        eng.score([[1], []])
    with pytest.raises(ValueError, match="out of range"):
        eng.score([[1, len(TOK) + 5]])
    eng.close()


def test_score_between_steps_leaves_running_sequences_alone():
    """Seeded samples are the same whether or not score() runs between the engine's steps (its KV and decode
    state are untouched), and scores taken while they run equal the forward."""
    model = micro()
    params = SamplingParams(max_new_tokens=24, temperature=1.0, seed=7)
    prompts = SEQS[1:3]
    alone = EmbeddedEngine(model, tokenizer=TOK, max_seqs=8)
    want = alone.generate_batch(prompts, params, n=2)
    alone.close()
    eng = EmbeddedEngine(model, tokenizer=TOK, max_seqs=8)
    scored, inner = [], eng.step

    def step():  # after every step of the worker (which holds the step lock, reentrant), a score()
        out = inner()
        scored.append(eng.score(SEQS))
        return out

    eng.step = step
    got = eng.generate_batch(prompts, params, n=2)
    eng.close()
    assert [[g.tokens for g in gs] for gs in got] == [[g.tokens for g in gs] for gs in want]
    assert [[g.logprobs for g in gs] for gs in got] == [[g.logprobs for g in gs] for gs in want]
    assert len(scored) >= 2 and all(s[1] == pytest.approx(reference(model, SEQS[1]), abs=1e-5) for s in scored)


def test_engines_without_score_say_so():
    class NoScore(InferenceEngine):
        caps = EngineCaps(in_process=True, pause_modes=("in_place",), transports=("memory",))
        from_config = generate = pause = update_weights = resume = None

    assert not NoScore.caps.score
    with pytest.raises(NotImplementedError, match="cannot score"):
        NoScore.score(object.__new__(NoScore), [[1]])


def test_sglang_input_token_logprobs(served):
    model, _, client = served
    seq = SEQS[2]
    r = client.post("/generate", json={"input_ids": seq, "sampling_params": {"max_new_tokens": 0},
                                       "return_logprob": True, "logprob_start_len": 0})
    assert r.status_code == 200, r.text
    item = r.json()
    meta = item["meta_info"]
    assert item["output_ids"] == [] and item["text"] == "" and meta["output_token_logprobs"] == []
    rows = meta["input_token_logprobs"]
    assert [t for _, t, _ in rows] == seq and rows[0][0] is None and all(x is None for _, _, x in rows)
    assert [0.0] + [lp for lp, _, _ in rows[1:]] == pytest.approx(reference(model, seq), abs=1e-5)
    # a batch, with the server's text of each token, and a later start (its first entry None, as SGLang pads)
    r = client.post("/generate", json={"input_ids": SEQS[1:3], "sampling_params": {"max_new_tokens": 0},
                                       "return_logprob": True, "logprob_start_len": 3,
                                       "return_text_in_logprobs": True})
    items = r.json()
    assert len(items) == 2
    for s, it in zip(SEQS[1:3], items):
        rows = it["meta_info"]["input_token_logprobs"]
        assert [t for _, t, _ in rows] == s[3:] and rows[0][0] is None
        assert [x for _, _, x in rows] == [TOK.decode([t]) for t in s[3:]]
        assert [lp for lp, _, _ in rows[1:]] == pytest.approx(reference(model, s)[4:], abs=1e-5)
    # with generation: the prompt's log-probs and the sampled tokens'
    r = client.post("/generate", json={"input_ids": seq, "sampling_params": {"max_new_tokens": 3, "temperature": 0},
                                       "return_logprob": True, "logprob_start_len": 0}).json()
    assert len(r["output_ids"]) >= 1 and len(r["meta_info"]["input_token_logprobs"]) == len(seq)


@pytest.mark.parametrize("body,match", [
    ({"sampling_params": {"max_new_tokens": 0}, "return_logprob": True}, "max_new_tokens=0"),
    ({"return_logprob": True, "logprob_start_len": 0, "stream": True}, "not streamed"),
    ({"return_logprob": True, "logprob_start_len": "0"}, "logprob_start_len: expected int"),
])
def test_sglang_scoring_errors(served, body, match):
    r = served[2].post("/generate", json={"input_ids": SEQS[1], **body})
    assert r.status_code == 400 and match in r.json()["error"]["message"]


def test_openai_prompt_logprobs_and_echo(served):
    model, _, client = served
    seq = SEQS[2]
    want = reference(model, seq)
    r = client.post("/v1/completions", json={"prompt": seq, "max_tokens": 0, "prompt_logprobs": 0})
    assert r.status_code == 200, r.text
    [c] = r.json()["choices"]
    pl = c["prompt_logprobs"]
    assert pl[0] is None and len(pl) == len(seq) and c["text"] == ""
    for t, (tid, d) in enumerate(zip(seq[1:], pl[1:]), 1):
        assert list(d) == [str(tid)] and d[str(tid)]["decoded_token"] == TOK.decode([tid])
        assert d[str(tid)]["logprob"] == pytest.approx(want[t], abs=1e-5) and d[str(tid)]["rank"] is None
    # vLLM's echo without generation: the prompt is the text, its log-probs the legacy ones (first None)
    r = client.post("/v1/completions", json={"prompt": SEQS[1:3], "max_tokens": 0, "echo": True, "logprobs": 0,
                                             "return_tokens_as_token_ids": True}).json()
    assert [c["index"] for c in r["choices"]] == [0, 1]
    for s, c in zip(SEQS[1:3], r["choices"]):
        assert c["text"] == TOK.decode(s) and c["prompt_logprobs"][0] is None
        lp = c["logprobs"]
        assert lp["tokens"] == [f"token_id:{t}" for t in s] and lp["token_logprobs"][0] is None
        assert lp["token_logprobs"][1:] == pytest.approx(reference(model, s)[1:], abs=1e-5)
        assert c["prompt_logprobs"][1][str(s[1])]["decoded_token"] == f"token_id:{s[1]}"
    # prompt_logprobs beside a generation
    r = client.post("/v1/completions", json={"prompt": seq, "max_tokens": 2, "prompt_logprobs": 0}).json()
    assert len(r["choices"][0]["prompt_logprobs"]) == len(seq) and r["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("path,body,match", [
    ("/v1/completions", {"max_tokens": 0, "prompt_logprobs": 2}, "only 0 is supported"),
    ("/v1/completions", {"max_tokens": 0, "echo": True, "logprobs": 3}, "only 0 is supported"),
    ("/v1/completions", {"max_tokens": 4, "echo": True}, "echo: supported with max_tokens=0"),
    ("/v1/completions", {"max_tokens": 0, "prompt_logprobs": 0, "stream": True}, "stream=true"),
    ("/v1/completions", {"max_tokens": 0}, "max_tokens=0"),
    ("/v1/completions", {"prompt_logprobs": -1}, "out of range"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "echo": True}, "not supported in chat"),
])
def test_openai_scoring_errors(served, path, body, match):
    r = served[2].post(path, json={"prompt": SEQS[1], **body})
    assert r.status_code == 400 and match in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("api", ["sglang", "openai"])
def test_remote_engine_score_both_apis(served, api):
    model, url, _ = served
    remote = RemoteEngine([url], api=api, max_concurrency=3)  # 4 sequences: two requests
    assert remote.caps.score
    got = remote.score(SEQS)
    for seq, lp in zip(SEQS, got):
        assert lp == pytest.approx(reference(model, seq), abs=1e-5)
    assert remote.score([]) == [] and remote.counters["requests"] == 2
    with pytest.raises(RemoteError, match="out of range"):  # a 4xx is not retried
        remote.score([[1, len(TOK) + 5]])
    with pytest.raises(ValueError, match="at least one token"):
        remote.score([[]])


def test_remote_score_fails_over_to_a_live_server(served):
    model, url, _ = served
    dead = f"http://127.0.0.1:{_free_port()}"
    remote = RemoteEngine([dead, url], api="sglang", retry_backoff=0.01)
    for _ in range(3):  # whichever server is chosen first, the live one answers
        assert remote.score(SEQS[:2])[1] == pytest.approx(reference(model, SEQS[1]), abs=1e-5)
    with pytest.raises(RemoteError, match="no server reachable"):
        RemoteEngine([dead], retry_backoff=0.01, max_retries=1).score(SEQS[:1])


def test_server_over_an_engine_without_score_answers_400():
    class Plain(HFEngine):
        caps = EngineCaps(in_process=True, pause_modes=("in_place",), transports=("memory",))

    model = micro()
    srv = Server(Plain(model, TOK), TOK, model=model, port=0)
    port = srv.start()
    try:
        r = httpx.post(f"http://127.0.0.1:{port}/generate", json={
            "input_ids": SEQS[1], "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
            "logprob_start_len": 0}, trust_env=False, timeout=30)
        assert r.status_code == 400 and "cannot score prompts" in r.json()["error"]["message"]
    finally:
        srv.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_score_runs_on_the_hf_engine_server():
    """HFEngine computes on the server's engine loop: scoring is serialised with its generation there."""
    model = micro()
    srv = Server(HFEngine(model, TOK), TOK, model=model, port=0)
    port = srv.start()
    try:
        remote = RemoteEngine([f"http://127.0.0.1:{port}"], api="openai")

        async def both():
            gen = remote.generate(SEQS[1], SamplingParams(max_new_tokens=4, temperature=0.0), n=2)
            return await asyncio.gather(gen, asyncio.to_thread(remote.score, SEQS))

        gens, scores = asyncio.run(both())
        assert len(gens) == 2 and scores[3] == pytest.approx(reference(model, SEQS[3]), abs=1e-5)
    finally:
        srv.stop()
