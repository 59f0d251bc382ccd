"""Evaluation: greedy pass@1 and sampled mean@k / pass@k on a held-out set.

Every answer is one episode of the task's workflow (the one training runs: a tool task is evaluated with
its tools), and an answer is correct when its raw reward >= `correct_threshold` (``algo.correct_threshold``).
"""
from __future__ import annotations

from math import comb

from thinkrl.rollout.workflow import run_batched
from thinkrl.types import Sample, SamplingParams

EVAL_SEED = 1234  # the sampled evaluation's seed: the same draws at every evaluation, comparable across runs


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator (Chen et al. 2021) from n samples with c correct."""
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def evaluate(engine, workflow, samples: list[Sample], max_new_tokens: int, *, correct_threshold: float,
             k: int = 0, temperature: float = 1.0, batch_size: int = 256) -> dict:
    """Returns {"acc/greedy", "reward/greedy", "eval/n", and with k > 0: "acc/mean@k", "pass@k"}.

    `workflow` is the task's workflow (`system.setup.make_workflow`); evaluation runs copies of it that sample
    greedily (n=1), and with k > 0 at `temperature` with seed `EVAL_SEED` (k episodes per prompt). At most
    `batch_size` answers are generated at a time. An episode the workflow drops counts as wrong, reward 0."""
    stops = list(workflow.params.stop_token_ids)
    greedy = workflow.with_sampling(SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0,
                                                   stop_token_ids=stops), 1)
    rewards = [trajs[0].reward if trajs else 0.0 for trajs in run_batched(engine, greedy, samples, batch_size)]
    out = {
        "acc/greedy": sum(r >= correct_threshold for r in rewards) / max(len(rewards), 1),
        "reward/greedy": sum(rewards) / max(len(rewards), 1),
        "eval/n": len(samples),
    }
    if k > 0:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, stop_token_ids=stops,
                                seed=EVAL_SEED)
        sampled = workflow.with_sampling(params, k)
        correct, pk = [], []
        for trajs in run_batched(engine, sampled, samples, max(1, batch_size // k)):
            c = sum(t.reward >= correct_threshold for t in trajs)
            correct.append(c / k)
            pk.append(pass_at_k(k, c, k))
        out[f"acc/mean@{k}"] = sum(correct) / max(len(correct), 1)
        out[f"pass@{k}"] = sum(pk) / max(len(pk), 1)
    return out
