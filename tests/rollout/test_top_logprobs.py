"""Top-N alternatives (SamplingParams.top_logprobs) from the embedded and HF engines: equal to the N largest
entries of a teacher-forced log-softmax, through continuous batching and slot compaction, and absent unless
asked for."""
from __future__ import annotations

import asyncio

import pytest
import torch

from thinkrl.models.micro import build_micro_model
from thinkrl.rollout.engine import EmbeddedEngine
from thinkrl.rollout.hf import HFEngine
from thinkrl.types import SamplingParams


@pytest.fixture(scope="module")
def model(tok):
    return build_micro_model(tok, seed=0).eval()


@torch.no_grad()
def reference_top(model, prompt, tokens, n):
    """Per generated position: the n most likely (token, log-prob) under the model (temperature 1)."""
    logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0].float()
    lp = torch.log_softmax(logits[len(prompt) - 1: len(prompt) - 1 + len(tokens)], -1)
    v, i = lp.topk(n, -1)
    return i.tolist(), v.tolist()


def check(model, prompt, g, n):
    assert g.top_logprobs is not None and len(g.top_logprobs) == len(g.tokens)
    ids, vals = reference_top(model, prompt, g.tokens, n)
    for k, alts in enumerate(g.top_logprobs):
        assert [t for t, _ in alts] == ids[k]
        assert [v for _, v in alts] == pytest.approx(vals[k], abs=1e-4)
        assert g.logprobs[k] <= alts[0][1] + 1e-6  # nothing beats the most likely


def test_embedded_top_n_through_compaction(model, tok):
    """Short sequences in low slots finish first, the long ones (with top-N) are moved down: their
    alternatives move with them. Requests without top-N get none."""
    eng = EmbeddedEngine(model, tokenizer=tok, stop_at_eos=False, max_seqs=16)
    try:
        prompts = [tok.encode(f"shared prefix / item {i}") for i in range(12)]
        reqs = [(p, SamplingParams(max_new_tokens=30 if i >= 9 else 2 + i, seed=i,
                                   top_logprobs=(3 if i % 2 else 0) + (2 if i >= 9 else 0)))
                for i, p in enumerate(prompts)]

        async def run():
            return await asyncio.gather(*[eng.generate(p, sp, n=1) for p, sp in reqs])

        results = asyncio.run(run())
        assert eng.stats()["compactions"] >= 1
        for (p, sp), [g] in zip(reqs, results):
            if sp.top_logprobs:
                check(model, p, g, sp.top_logprobs)
            else:
                assert g.top_logprobs is None
        [greedy] = eng.generate_batch([prompts[0]], SamplingParams(max_new_tokens=6, temperature=0, top_logprobs=1))[0]
        assert [a[0][0] for a in greedy.top_logprobs] == greedy.tokens  # top-1 of greedy is the token itself
    finally:
        eng.close()


def test_hf_top_n(model, tok):
    eng = HFEngine(model, tok)
    prompts = [tok.encode("What is 2+3?"), tok.encode("a")]
    groups = eng.generate_batch(prompts, SamplingParams(max_new_tokens=5, seed=0, top_logprobs=4), n=2)
    for p, gs in zip(prompts, groups):
        for g in gs:
            check(model, p, g, 4)
    assert eng.generate_batch(prompts[:1], SamplingParams(max_new_tokens=3))[0][0].top_logprobs is None
