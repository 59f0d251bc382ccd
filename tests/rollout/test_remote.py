"""RemoteEngine against real thinkrl servers on 127.0.0.1: both APIs, limits, retries, failover, resume, weights."""
import asyncio
import http.client
import json
import socket
import threading
import time

import pytest
import torch

from thinkrl.config import Config
from thinkrl.models.micro import build_micro_model, build_tokenizer
from thinkrl.rollout.base import InferenceEngine
from thinkrl.rollout.engine import EmbeddedEngine
from thinkrl.rollout.hf import HFEngine
from thinkrl.rollout.remote import RemoteEngine, RemoteError
from thinkrl.rollout.server import Server
from thinkrl.types import Generation, SamplingParams

TOK = build_tokenizer()
PROMPT = TOK.apply_chat_template([{"role": "user", "content": "7*6"}], add_generation_prompt=True, tokenize=True,
                                 return_dict=True)["input_ids"]
GREEDY = SamplingParams(max_new_tokens=10, temperature=0.0, stop_token_ids=[TOK.eos_token_id])


def micro(seed=0):
    return build_micro_model(TOK, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
                             max_position=64, seed=seed).eval()


def forward_logprobs(model, prompt, tokens):
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([prompt + tokens])).logits[0].float(), -1)
    rows = lp[len(prompt) - 1: len(prompt) - 1 + len(tokens)]
    return [rows[i, t].item() for i, t in enumerate(tokens)], rows.argmax(-1).tolist()


def call(port, path, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", path, body=json.dumps(body or {}), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    out = r.status, r.read()
    conn.close()
    return out


def wait_for(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.005)


class Fleet:
    """k servers, each with its own micro model and engine."""

    def __init__(self, k=1, engine=HFEngine, wrap=None, **kw):
        self.models = [micro() for _ in range(k)]
        self.engines = [engine(m, TOK) if engine is HFEngine else engine(m, tokenizer=TOK, max_seqs=8)
                        for m in self.models]
        if wrap:
            self.engines = [wrap(e) for e in self.engines]
        self.servers = [Server(e, TOK, model=m, port=0, **kw) for e, m in zip(self.engines, self.models)]
        self.ports = [s.start() for s in self.servers]
        self.urls = [f"http://127.0.0.1:{p}" for p in self.ports]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for s, e in zip(self.servers, self.engines):
            s.stop()
            if hasattr(e, "close"):  # the embedded engine's worker thread
                e.close()


@pytest.mark.parametrize("api", ["sglang", "openai"])
def test_generate_matches_forward_for_both_apis(api):
    with Fleet(1) as f:
        remote = RemoteEngine(f.urls, api=api)
        gens = asyncio.run(remote.generate(PROMPT, GREEDY, n=3))
        assert len(gens) == 3 and all(g.tokens == gens[0].tokens for g in gens)
        g = gens[0]
        ref, greedy = forward_logprobs(f.models[0], PROMPT, g.tokens)
        assert greedy == g.tokens and g.logprobs == pytest.approx(ref, abs=1e-4)
        assert g.versions == [0] * len(g.tokens) and g.finish == ("length" if len(g.tokens) == 10 else "stop")
        assert remote.generate_batch([PROMPT, PROMPT[:4]], GREEDY, 1)[0][0].tokens == g.tokens


def test_concurrency_limit_per_server():
    with Fleet(1) as f:
        remote = RemoteEngine(f.urls, max_concurrency=2)
        assert call(f.ports[0], "/pause_generation", {"mode": "in_place"})[0] == 200

        async def go():
            tasks = [asyncio.create_task(remote.generate(PROMPT, GREEDY)) for _ in range(5)]
            await asyncio.to_thread(wait_for, lambda: f.servers[0].queued == 2)
            await asyncio.sleep(0.2)
            held = (f.servers[0].queued, remote.servers[0].load)  # only 2 reached the server; 3 wait in the client
            await asyncio.to_thread(call, f.ports[0], "/continue_generation")
            return held, await asyncio.gather(*tasks)

        held, gens = asyncio.run(go())
        assert held == (2, 2)
        assert len(gens) == 5 and remote.servers[0].load == 0


def test_killed_server_fails_over_to_the_other():
    with Fleet(2) as f:
        remote = RemoteEngine(f.urls, retry_backoff=0.01)
        for p in f.ports:
            call(p, "/pause_generation", {"mode": "in_place"})

        async def go():
            task = asyncio.create_task(remote.generate(PROMPT, GREEDY, n=2))
            await asyncio.to_thread(wait_for, lambda: any(s.queued for s in f.servers))
            victim = next(i for i, s in enumerate(f.servers) if s.queued)
            f.servers[victim].stop()  # killed mid-request
            await asyncio.to_thread(call, f.ports[1 - victim], "/continue_generation")
            return victim, await task

        victim, gens = asyncio.run(go())
        assert len(gens) == 2 and all(1 <= len(g.tokens) <= 10 for g in gens)
        ref, greedy = forward_logprobs(f.models[1 - victim], PROMPT, gens[0].tokens)
        assert greedy == gens[0].tokens and gens[0].logprobs == pytest.approx(ref, abs=1e-4)
        st = remote.stats()
        assert st["failovers"] == 1 and st["servers"][victim]["dead"] and not st["servers"][1 - victim]["dead"]


def test_overloaded_server_is_retried_with_backoff():
    with Fleet(1, max_queue=1) as f:
        port = f.ports[0]
        call(port, "/pause_generation", {"mode": "in_place"})
        body = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 4}}
        blocker = threading.Thread(target=call, args=(port, "/generate", body))
        blocker.start()
        wait_for(lambda: f.servers[0].queued == 1)
        remote = RemoteEngine(f.urls, retry_backoff=0.05, max_retries=6)

        async def go():
            task = asyncio.create_task(remote.generate(PROMPT, GREEDY))
            await asyncio.to_thread(wait_for, lambda: remote.counters["retries"] >= 1)
            retries = remote.counters["retries"]
            await asyncio.to_thread(call, port, "/continue_generation")
            return retries, await task

        retries, gens = asyncio.run(go())
        blocker.join(timeout=20)
        assert retries >= 1 and len(gens[0].tokens) >= 1 and not remote.stats()["servers"][0]["dead"]


def test_client_errors_are_not_retried_and_dead_servers_raise():
    with Fleet(1) as f:
        remote = RemoteEngine(f.urls)
        with pytest.raises(RemoteError, match="context length"):
            asyncio.run(remote.generate(PROMPT, SamplingParams(max_new_tokens=500)))
        assert remote.counters["retries"] == remote.counters["failovers"] == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    remote = RemoteEngine([f"http://127.0.0.1:{port}"], max_retries=2, retry_backoff=0.01, dead_cooldown=0.01)
    with pytest.raises(RemoteError, match="after 3 attempts"):
        asyncio.run(remote.generate(PROMPT, GREEDY))


class AbortOnce(InferenceEngine):
    """An engine whose first answer stops after `cut` tokens with finish="abort", as a server paused in abort mode
    for a weight update does; later tokens carry version 1."""

    caps = HFEngine.caps

    def __init__(self, inner, cut=3):
        self.inner, self.cut, self.calls = inner, cut, 0

    @classmethod
    def from_config(cls, cfg, model, tokenizer, version=0):
        raise NotImplementedError

    @property
    def version(self):
        return self.inner.version

    async def generate(self, ids, params, n=1):
        gens = await self.inner.generate(ids, params, n)
        self.calls += 1
        if self.calls == 1:
            self.inner.version = 1
            return [Generation(g.tokens[: self.cut], g.logprobs[: self.cut], g.versions[: self.cut], "abort")
                    for g in gens]
        return gens

    def pause(self, mode=None):
        self.inner.pause(mode)

    def resume(self):
        self.inner.resume()

    def update_weights(self, src, version):
        self.inner.update_weights(src, version)


def test_aborted_samples_are_resumed_on_the_same_server():
    with Fleet(2, wrap=AbortOnce) as f:
        remote = RemoteEngine(f.urls)
        gens = asyncio.run(remote.generate(PROMPT, GREEDY, n=2))
        served = [i for i, e in enumerate(f.engines) if e.calls]
        assert len(served) == 1 and f.engines[served[0]].calls == 3  # 1 request + 2 resumes, all sticky
        assert remote.counters["resumes"] == 2
        full = HFEngine(f.models[0], TOK).generate_batch([PROMPT], GREEDY)[0][0]  # uninterrupted greedy run
        for g in gens:
            assert g.tokens == full.tokens and g.finish == full.finish
            assert g.logprobs == pytest.approx(forward_logprobs(f.models[0], PROMPT, g.tokens)[0], abs=1e-4)
            assert g.versions == [0] * 3 + [1] * (len(g.tokens) - 3)


def test_update_weights_on_all_servers_and_catch_up(tmp_path):
    new = micro(seed=1)
    new.save_pretrained(tmp_path / "v3")
    with Fleet(2) as f:
        remote = RemoteEngine(f.urls)
        remote.load_weights(str(tmp_path / "v3"), 3)
        assert remote.version == 3 and [e.version for e in f.engines] == [3, 3]
        for m in f.models:
            assert torch.equal(m.model.layers[0].mlp.up_proj.weight, new.model.layers[0].mlp.up_proj.weight)
        g = asyncio.run(remote.generate(PROMPT, GREEDY))[0]
        assert g.versions == [3] * len(g.tokens)
        assert g.logprobs == pytest.approx(forward_logprobs(new, PROMPT, g.tokens)[0], abs=1e-4)
        with pytest.raises(RemoteError, match="no such file"):
            remote.load_weights(str(tmp_path / "missing"), 4)
        assert remote.version == 3 and [e.version for e in f.engines] == [3, 3]
        # a state dict is written to weights_dir first; server 1 is down during the update and catches up later
        third = micro(seed=2)
        remote.servers[1].dead_until = float("inf")
        remote.load_weights(third.state_dict(), 5)
        assert [e.version for e in f.engines] == [5, 3]
        remote.servers[1].dead_until, remote.servers[0].dead_until = 0.0, float("inf")
        g = asyncio.run(remote.generate(PROMPT, GREEDY))[0]
        assert f.engines[1].version == 5 and g.versions == [5] * len(g.tokens)
        assert g.logprobs == pytest.approx(forward_logprobs(third, PROMPT, g.tokens)[0], abs=1e-4)


def test_weight_update_during_rollout_aborts_and_resumes(tmp_path):
    """Embedded engine, pause mode abort: the in-flight sample is cut, resumed, and spans two versions."""
    micro(seed=1).save_pretrained(tmp_path / "w")
    params = SamplingParams(max_new_tokens=50, temperature=1.0)
    with Fleet(1, engine=EmbeddedEngine) as f:
        engine, remote = f.engines[0], RemoteEngine(f.urls, pause_mode="abort")
        gate = {"held": 0}
        step = engine.step

        def held_step():
            """Once a sample has 2 tokens, hold the engine (step lock released) until the pause arrives, so
            the update lands mid-sample however slow the machine is."""
            out = step()
            if not gate["held"] and engine.scheduler.running and engine.progress() >= 2:
                gate["held"] = 1
                engine._step_lock.release()
                try:
                    wait_for(lambda: engine._paused, timeout=60)
                finally:
                    engine._step_lock.acquire()
            return out

        engine.step = held_step

        async def attempt(v):
            task = asyncio.create_task(remote.generate(PROMPT, replace_seed(params, v)))
            await asyncio.to_thread(wait_for, lambda: gate["held"] or task.done(), 60)
            await asyncio.to_thread(remote.load_weights, str(tmp_path / "w"), v)
            return await task

        for v in range(1, 6):  # a sample may stop before its second token: then try the next seed
            gate["held"] = 0
            g = asyncio.run(attempt(v))[0]
            assert g.versions == sorted(g.versions) and set(g.versions) <= {v - 1, v}
            assert len(g.tokens) == 50 or g.finish == "stop"
            if gate["held"]:
                assert remote.counters["resumes"] >= 1 and set(g.versions) == {v - 1, v}
                break
        assert gate["held"] and remote.counters["resumes"] >= 1


def replace_seed(params, seed):
    return SamplingParams(**{**params.__dict__, "seed": seed})


def test_from_config_and_bad_config():
    cfg = Config()
    cfg.rollout.servers, cfg.rollout.server_api = ["http://127.0.0.1:1", "http://127.0.0.1:2/"], "openai"
    cfg.rollout.max_concurrency, cfg.rollout.request_timeout = 4, 12.0
    r = RemoteEngine.from_config(cfg, None, None, version=7)
    assert [s.url for s in r.servers] == ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    assert (r.api, r.servers[0].limit, r.request_timeout, r.version, r.pause_mode) == ("openai", 4, 12.0, 7, "abort")
    cfg.rollout.servers = []
    with pytest.raises(ValueError, match="rollout.servers"):
        RemoteEngine.from_config(cfg, None, None)
    with pytest.raises(ValueError, match="rollout.server_api"):
        RemoteEngine(["http://x:1"], api="grpc")
    with pytest.raises(ValueError, match="rollout.servers"):
        RemoteEngine(["x:1"])
