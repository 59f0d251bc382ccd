"""Evaluation: greedy pass@1 and sampled mean@k / pass@k on a held-out set."""
from __future__ import annotations

from math import comb

from thinkrl.data.chat import encode_prompt
from thinkrl.rollout.base import generate_all
from thinkrl.types import Sample, SamplingParams


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator (Chen et al. 2021) from n samples with c correct."""
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def evaluate(engine, tokenizer, task, samples: list[Sample], max_new_tokens: int, k: int = 0,
             temperature: float = 1.0, batch_size: int = 256, stop_token_ids: list[int] | None = None) -> dict:
    """Returns {"acc/greedy", "reward/greedy", and with k > 0: "acc/mean@k", "pass@k"}."""
    prompts = [encode_prompt(tokenizer, task.build_prompt(s)) for s in samples]
    stops = list(stop_token_ids or [tokenizer.eos_token_id])
    greedy = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=stops)
    rewards = []
    for i in range(0, len(prompts), batch_size):
        gens = generate_all(engine, prompts[i : i + batch_size], greedy, 1)
        for g, s in zip(gens, samples[i : i + batch_size]):
            rewards.append(float(task.reward(tokenizer.decode(g[0].tokens, skip_special_tokens=True), s)))
    out = {
        "acc/greedy": sum(r >= 1.0 for r in rewards) / max(len(rewards), 1),
        "reward/greedy": sum(rewards) / max(len(rewards), 1),
        "eval/n": len(samples),
    }
    if k > 0:
        sampled = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, stop_token_ids=stops, seed=1234)
        correct, pk = [], []
        per = max(1, batch_size // k)
        for i in range(0, len(prompts), per):
            gens = generate_all(engine, prompts[i : i + per], sampled, k)
            for g, s in zip(gens, samples[i : i + per]):
                c = sum(float(task.reward(tokenizer.decode(x.tokens, skip_special_tokens=True), s)) >= 1.0 for x in g)
                correct.append(c / k)
                pk.append(pass_at_k(k, c, k))
        out[f"acc/mean@{k}"] = sum(correct) / len(correct)
        out[f"pass@{k}"] = sum(pk) / len(pk)
    return out
