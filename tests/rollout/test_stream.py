"""generate_stream: the embedded engine hands over each token as it is sampled (while the sequence is still
running), the tokens equal generate()'s for the same seed, top-N comes along, and closing the stream early
frees the request; the base default (other engines) yields each sample once, done."""
from __future__ import annotations

import asyncio

from thinkrl.models.micro import build_micro_model
from thinkrl.rollout.engine import EmbeddedEngine
from thinkrl.rollout.hf import HFEngine
from thinkrl.types import SamplingParams


def test_embedded_streams_tokens_while_running(tok):
    model = build_micro_model(tok, seed=0).eval()
    eng = EmbeddedEngine(model, tokenizer=tok, stop_at_eos=False)
    try:
        params = SamplingParams(max_new_tokens=240, seed=3, top_logprobs=2)
        prompt = tok.encode("stream me")

        async def run():
            got, while_running = {0: [], 1: []}, None
            async for ev in eng.generate_stream(prompt, params, n=2):
                if while_running is None:  # the first token: stop the engine here and look
                    eng.pause("in_place")
                    while_running = (eng.stats()["running"], eng.progress())
                    eng.resume()
                got[ev.index] += ev.tokens
                if ev.done is not None:
                    assert ev.done.tokens == got[ev.index] and len(ev.done.top_logprobs) == len(ev.done.tokens)
                else:
                    assert len(ev.tokens) == 1 and len(ev.top_logprobs[0]) == 2
            return got, while_running

        got, (running, progress) = asyncio.run(run())
        assert running == 2 and progress < 240  # the first token arrived while both samples were being generated
        ref = eng.generate_batch([prompt], params, n=2)[0]
        assert [got[0], got[1]] == [g.tokens for g in ref] and all(len(g.tokens) == 240 for g in ref)

        async def early():  # a client that goes away after one token
            agen = eng.generate_stream(prompt, params, n=1)
            async for _ in agen:
                break
            await agen.aclose()
        asyncio.run(early())
        for _ in range(200):
            if eng.stats()["running"] == 0 and eng._streaming == 0:
                break
            asyncio.run(asyncio.sleep(0.01))
        assert eng.stats()["running"] == 0 and eng.stats()["waiting"] == 0
    finally:
        eng.close()


def test_default_stream_yields_each_sample_done(tok):
    model = build_micro_model(tok, seed=0).eval()
    eng = HFEngine(model, tok)

    async def run():
        return [ev async for ev in eng.generate_stream(tok.encode("ab"), SamplingParams(max_new_tokens=4), n=2)]
    evs = asyncio.run(run())
    assert [e.index for e in evs] == [0, 1] and all(e.done is not None and e.tokens == e.done.tokens for e in evs)
