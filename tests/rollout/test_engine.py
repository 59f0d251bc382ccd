"""EmbeddedEngine: log-prob agreement with Hugging Face, greedy equality, stops, seeds, pause/update/resume,
abort, concurrency and the memory budget. Tiny random models; the whole file runs in a few seconds."""
from __future__ import annotations

import asyncio

import pytest
import torch

from thinkrl.models.micro import build_micro_model
from thinkrl.rollout.base import InferenceEngine, engine_class
from thinkrl.rollout.engine import EmbeddedEngine
from thinkrl.rollout.forward import pick_linear
from thinkrl.rollout.sampling import sample, uniforms
from thinkrl.types import SamplingParams


@pytest.fixture(scope="module")
def model(tok):
    return build_micro_model(tok, seed=0).eval()


@pytest.fixture
def make(model, tok):
    engines = []

    def _make(m=None, **kw):
        kw.setdefault("tokenizer", tok)
        e = EmbeddedEngine(m if m is not None else model, **kw)
        engines.append(e)
        return e

    yield _make
    for e in engines:
        e.close()


def prompts_of(tok, texts):
    return [tok.encode(t) for t in texts]


TEXTS = ["a", "What is 2+3?", "The quick brown fox jumps over the lazy dog", "<|user|>hi<|end|><|assistant|>"]


@torch.no_grad()
def hf_logprobs(model, prompt, tokens):
    logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0].float()
    lp = torch.log_softmax(logits[len(prompt) - 1: -1], -1)
    return lp.gather(1, torch.tensor(tokens)[:, None])[:, 0]


def max_logprob_diff(model, prompts, groups):
    return max((hf_logprobs(model, p, g.tokens) - torch.tensor(g.logprobs)).abs().max().item()
               for p, gs in zip(prompts, groups) for g in gs)


def test_registered():
    assert engine_class("embedded") is EmbeddedEngine and issubclass(EmbeddedEngine, InferenceEngine)


def test_logprobs_match_hf_mixed_lengths(make, model, tok):
    prompts = prompts_of(tok, TEXTS)
    eng = make(stop_at_eos=False)
    groups = eng.generate_batch(prompts, SamplingParams(max_new_tokens=24, temperature=0.7, seed=3), n=3)
    assert [len(gs) for gs in groups] == [3] * len(prompts)
    for gs in groups:
        for g in gs:
            assert len(g.tokens) == len(g.logprobs) == len(g.versions) == 24 and g.finish == "length"
    assert max_logprob_diff(model, prompts, groups) <= 1e-4


def test_other_architectures_and_fallback(make, tok):
    """Qwen2 (q/k/v bias, untied head), Llama with llama3 rope scaling, and the HF fallback forward."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(1)
    qwen = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False)).eval()
    with torch.no_grad():  # make the biases matter
        for layer in qwen.model.layers:
            layer.self_attn.q_proj.bias.normal_(0, 0.5)
            layer.self_attn.k_proj.bias.normal_(0, 0.5)
    rope = {"rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    llama = LlamaForCausalLM(LlamaConfig(**common, rope_parameters=rope)).eval()
    prompts = prompts_of(tok, TEXTS[1:3])
    params = SamplingParams(max_new_tokens=40, seed=0)
    for m, forward in ((qwen, "lean"), (llama, "lean"), (llama, "hf")):
        eng = make(m, forward=forward, stop_at_eos=False)
        assert type(eng.runner.model).__name__ == ("LeanRunner" if forward == "lean" else "HFRunner")
        assert max_logprob_diff(m, prompts, eng.generate_batch(prompts, params, n=2)) <= 1e-4


def test_pick_linear_returns_a_kernel_equal_to_f_linear():
    import torch.nn.functional as F

    lin = pick_linear(torch.device("cpu"), torch.float32, (16, 32, 48), reps=2)
    x, w, b = torch.randn(16, 32), torch.randn(48, 32), torch.randn(48)
    assert torch.allclose(lin(x, w, b), F.linear(x, w, b), atol=1e-5)
    assert torch.allclose(lin(x, w), F.linear(x, w), atol=1e-5)
    assert pick_linear(torch.device("cpu"), torch.bfloat16) is F.linear  # only fp32 has a choice


def test_unsupported_rope_is_refused(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1,
                      rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="rope type 'dynamic'"):
        EmbeddedEngine(LlamaForCausalLM(cfg), forward="lean")


def test_greedy_equals_hf_generate(make, model, tok):
    prompts = prompts_of(tok, TEXTS)
    eng = make()
    groups = eng.generate_batch(prompts, SamplingParams(max_new_tokens=30, temperature=0.0), n=2)
    for p, (a, b) in zip(prompts, groups):
        ref = model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=30,
                             pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        assert a.tokens == b.tokens == ref
        assert a.finish == ("stop" if ref[-1] == tok.eos_token_id else "length")


def test_stop_token_ids_and_strings(make, tok):
    eng = make(stop_at_eos=False)
    prompt = tok.encode("Once upon a time")
    greedy = SamplingParams(max_new_tokens=40, temperature=0.0)
    full = eng.generate_batch([prompt], greedy)[0][0].tokens
    stop_id = full[6]
    cut = full.index(stop_id) + 1
    g = eng.generate_batch([prompt], SamplingParams(max_new_tokens=40, temperature=0.0, stop_token_ids=[stop_id]))[0][0]
    assert g.tokens == full[:cut] and g.finish == "stop" and len(g.logprobs) == cut
    # a stop string: the output ends with the token that completes its first occurrence
    text = tok.decode(full)
    stop = text[8:10]
    k = next(i for i in range(1, len(full) + 1) if stop in tok.decode(full[:i]))
    g = eng.generate_batch([prompt], SamplingParams(max_new_tokens=40, temperature=0.0, stop=[stop]))[0][0]
    assert g.tokens == full[:k] and g.finish == "stop"
    with pytest.raises(ValueError, match="stop"):
        make(tokenizer=None).generate_batch([prompt], SamplingParams(stop=["x"]))


def test_max_new_tokens_gives_length_and_eos_stops(make, tok):
    eng = make(stop_at_eos=False)
    (g,), = eng.generate_batch([tok.encode("hi")], SamplingParams(max_new_tokens=7, seed=1))
    assert len(g.tokens) == 7 and g.finish == "length"
    # with stop_at_eos (default), the model's EOS id ends a sequence: find a seed that samples it
    eng = make(max_seqs=64)
    gens = eng.generate_batch([tok.encode("hi")], SamplingParams(max_new_tokens=60, temperature=3.0, seed=0), n=64)
    stopped = [g for g in gens[0] if g.finish == "stop"]
    assert stopped and all(g.tokens[-1] == tok.eos_token_id and tok.eos_token_id not in g.tokens[:-1] for g in stopped)
    assert all(len(g.tokens) == 60 and tok.eos_token_id not in g.tokens for g in gens[0] if g.finish == "length")


def test_seeds_reproducible_across_batch_composition(make, tok):
    eng = make(stop_at_eos=False, max_seqs=8)
    p = tok.encode("seeded prompt")
    params = SamplingParams(max_new_tokens=30, seed=1234, top_p=0.9, top_k=20)
    alone = eng.generate_batch([p], params, n=4)[0]
    others = [tok.encode("x" * i) for i in range(1, 6)]
    crowded = eng.generate_batch(others + [p], params, n=4)[-1]  # queued behind others, different slots
    assert [g.tokens for g in alone] == [g.tokens for g in crowded]
    assert len({tuple(g.tokens) for g in alone}) == 4  # the n samples differ
    other = eng.generate_batch([p], SamplingParams(max_new_tokens=30, seed=99, top_p=0.9, top_k=20))[0][0]
    assert other.tokens != alone[0].tokens
    # an unfiltered request gives the same tokens alone and batched beside a top-k/top-p one
    plain = SamplingParams(max_new_tokens=30, seed=7)

    async def mixed():
        return await asyncio.gather(eng.generate(p, plain), eng.generate(others[0], params))

    assert eng.generate_batch([p], plain)[0][0].tokens == asyncio.run(mixed())[0][0].tokens


def test_sampler_distribution_top_k_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]]).repeat(3, 1)
    temp, top_p, top_k = torch.tensor([0.5, 1.0, 1.0]), torch.tensor([1.0, 1.0, 0.8]), torch.tensor([0, 2, 0])
    N = 20000  # one sequence (seed 7) drawing at steps 0..N-1, for each of the three settings
    freq = torch.zeros(3, 5)
    for r in range(3):
        tok, lp = sample(logits[r:r + 1].expand(N, -1), temp[r].expand(N), top_p[r].expand(N),
                         top_k[r].expand(N), uniforms(torch.full((N,), 7), torch.arange(N)), True)
        freq[r] = torch.bincount(tok, minlength=5) / N
        assert torch.allclose(lp, torch.log_softmax(logits[r], -1)[tok])  # temperature-1 log-probs
    p0 = torch.softmax(logits[0] / 0.5, -1)
    p1 = torch.softmax(logits[1, :2], -1)
    probs = torch.softmax(logits[2], -1)  # [0.64, 0.24, 0.09, ...]: nucleus 0.8 keeps the first two
    p2 = probs[:2] / probs[:2].sum()
    assert (freq[0] - p0).abs().max() < 0.015
    assert (freq[1, :2] - p1).abs().max() < 0.015 and freq[1, 2:].sum() == 0
    assert (freq[2, :2] - p2).abs().max() < 0.015 and freq[2, 2:].sum() == 0
    greedy, _ = sample(logits[:1], torch.zeros(1), torch.ones(1), torch.zeros(1, dtype=torch.long),
                       torch.zeros(1, dtype=torch.double), False)
    assert greedy.item() == 0
    # plain=True (every row at temperature 1) skips the temperature ops: same tokens and log-probs
    x, u = torch.randn(64, 50), uniforms(torch.arange(64), torch.full((64,), 3))
    ones, k0 = torch.ones(64), torch.zeros(64, dtype=torch.long)
    for filt in (False, True):
        full, fast = (sample(x, ones, ones * 0.9, k0, u, filt, plain=pl) for pl in (False, True))
        assert torch.equal(full[0], fast[0]) and torch.allclose(full[1], fast[1])


async def _wait_for_tokens(eng, k):
    for _ in range(20000):
        if eng.progress() >= k:
            return
        await asyncio.sleep(0.0005)
    raise AssertionError("engine made no progress")


def test_pause_update_resume_tags_versions(make, model, tok):
    eng = make(stop_at_eos=False)
    new = build_micro_model(tok, seed=1).eval()
    p = tok.encode("partial rollout")
    params = SamplingParams(max_new_tokens=200, seed=5)
    first = eng.generate_batch([p], SamplingParams(max_new_tokens=4, seed=0))[0]  # fills the prefix cache

    async def run():
        task = asyncio.ensure_future(eng.generate(p, params, n=2))
        await _wait_for_tokens(eng, 3)
        eng.pause()
        eng.update_weights(new, version=1)
        assert eng.version == 1
        eng.resume()
        return await task

    for g in asyncio.run(run()):
        k = g.versions.index(1)
        assert len(g.tokens) == 200 and 3 <= k < 200
        assert g.versions == [0] * k + [1] * (200 - k)
    # the prefix cache was flushed: the same prompt now gets the new weights' log-probs exactly
    again = eng.generate_batch([p], SamplingParams(max_new_tokens=8, seed=0))[0]
    assert max_logprob_diff(new, [p], [again]) <= 1e-4 and again[0].versions == [1] * 8
    assert max_logprob_diff(model, [p], [first]) <= 1e-4
    with pytest.raises(ValueError, match="unknown parameter"):
        eng.update_weights({"nope.weight": torch.zeros(1)}, version=2)


def test_abort_returns_partial(make, tok):
    eng = make(stop_at_eos=False, max_seqs=2)
    params = SamplingParams(max_new_tokens=200, seed=0)

    async def run():
        tasks = [asyncio.ensure_future(eng.generate(tok.encode(t), params, n=2)) for t in ("abc", "xyz")]
        await _wait_for_tokens(eng, 3)
        eng.pause(mode="abort")
        return await asyncio.gather(*tasks)

    running, waiting = asyncio.run(run())  # max_seqs=2: the second request was still queued
    assert all(g.finish == "abort" and 3 <= len(g.tokens) < 200 for g in running)
    assert all(len(g.tokens) == len(g.logprobs) == len(g.versions) for g in running)
    assert all(g.finish == "abort" and g.tokens == [] for g in waiting)
    eng.resume()
    (g,), = eng.generate_batch([tok.encode("after")], SamplingParams(max_new_tokens=5))
    assert g.finish == "length" and len(g.tokens) == 5


def test_many_concurrent_requests_and_budget(make, model, tok):
    eng = make(stop_at_eos=False, max_seqs=6, max_tokens=6 * 40)
    prompts = [tok.encode(f"question {i}: " + "z" * (i % 7)) for i in range(30)]

    async def run():
        return await asyncio.gather(*[
            eng.generate(p, SamplingParams(max_new_tokens=3 + i % 11, seed=i), n=1 + i % 3)
            for i, p in enumerate(prompts)])

    results = asyncio.run(run())
    for i, gens in enumerate(results):
        assert len(gens) == 1 + i % 3 and all(len(g.tokens) == 3 + i % 11 for g in gens)
    assert eng.stats()["peak_running"] <= 6 and eng.stats()["running"] == 0
    assert max_logprob_diff(model, prompts, results) <= 1e-4
    # the token budget (prompt + max_new per sequence) limits concurrency further
    eng = make(stop_at_eos=False, max_seqs=6, max_tokens=2 * 30)
    eng.generate_batch(prompts[:4], SamplingParams(max_new_tokens=15), n=2)
    assert eng.stats()["peak_running"] == 2


def test_continuous_batching_compaction_and_prefix_sharing(make, model, tok):
    """Short sequences in low slots finish first; the long ones in high slots get compacted; prompts
    shared with earlier requests and n samples admitted in parts reuse cached prefixes."""
    eng = make(stop_at_eos=False, max_seqs=16)
    prompts = [tok.encode(f"shared prefix / item {i}") for i in range(12)]
    reqs = [(p, SamplingParams(max_new_tokens=40 if i >= 9 else 2 + i, seed=i)) for i, p in enumerate(prompts)]

    async def run():
        return await asyncio.gather(*[eng.generate(p, sp, n=1) for p, sp in reqs])

    results = asyncio.run(run())
    assert eng.stats()["compactions"] >= 1
    assert max_logprob_diff(model, prompts, results) <= 1e-4
    # one prefill batch mixing a long cached prefix (start 50, 1 new token) with a long uncached prompt
    eng = make(stop_at_eos=False, max_len=64)
    a, b = tok.encode("m" * 50), tok.encode("0123456789" * 4)
    eng.generate_batch([a], SamplingParams(max_new_tokens=2))
    groups = eng.generate_batch([a + tok.encode("!"), b], SamplingParams(max_new_tokens=5, seed=1), n=2)
    assert eng.stats()["prefix_hits"] >= 1 and max_logprob_diff(model, [a + tok.encode("!"), b], groups) <= 1e-4
    small = make(stop_at_eos=False, max_seqs=2)
    groups = small.generate_batch(prompts[:2], SamplingParams(max_new_tokens=5, seed=0), n=5)
    assert small.stats()["prefix_hits"] >= 4 and max_logprob_diff(model, prompts[:2], groups) <= 1e-4


def test_bad_input_errors(make, tok):
    eng = make(max_len=64)
    with pytest.raises(ValueError, match="max_new_tokens"):
        eng.generate_batch([tok.encode("hello")], SamplingParams(max_new_tokens=64))
    with pytest.raises(ValueError, match="top_p"):
        eng.generate_batch([tok.encode("hello")], SamplingParams(top_p=0.0))
    with pytest.raises(ValueError, match="input_ids"):
        eng.generate_batch([[]])
    with pytest.raises(ValueError, match="max_seqs"):
        make(max_seqs=0)
