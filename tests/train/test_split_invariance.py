"""The gradient of a batch does not depend on how it is split into micro-batches (global loss normalisers)."""
from __future__ import annotations

import random

import pytest
import torch

from thinkrl.algo.config import AlgoConfig
from thinkrl.config import TrainConfig
from thinkrl.models.micro import build_micro_model
from thinkrl.train.engine import TrainEngine, split_by_tokens
from thinkrl.train.packing import make_micro_batches
from thinkrl.types import Batch, Trajectory

TOL = 1e-5


def tiny_model(tok, seed: int = 0):
    return build_micro_model(tok, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                             seed=seed)


def make_batch(vocab: int, n_groups: int = 4, n: int = 2, seed: int = 0) -> Batch:
    """Groups of n responses sharing a prompt; varied lengths; off-policy behaviour log-probs; per-token advantages."""
    rng = random.Random(seed)
    trajs, advs = [], []
    for g in range(n_groups):
        p = rng.randint(3, 8)
        prompt = [rng.randrange(8, vocab) for _ in range(p)]
        for k in range(n):
            r = rng.randint(2, 12)
            toks = prompt + [rng.randrange(8, vocab) for _ in range(r)]
            trajs.append(Trajectory(
                sample_id=f"s{g}", group_id=f"g{g}", tokens=toks, loss_mask=[False] * p + [True] * r,
                logprobs=[0.0] * p + [-rng.uniform(3.0, 6.0) for _ in range(r)], versions=[-1] * p + [0] * r,
                reward=float(k % 2), prompt_len=p))
            a = rng.uniform(-1.5, 1.5)
            advs.append([0.0] * p + [a] * r)
    return Batch(trajectories=trajs, advantages=advs)


def grads_after_step(tok, batch, max_tokens_per_mb: int, loss_agg: str, packing: bool = True, seed: int = 0):
    """(gradients after one step, step metrics, number of micro-batches) on a fresh model."""
    tcfg = TrainConfig(max_tokens_per_mb=max_tokens_per_mb, packing=packing, share_prompt=packing, grad_clip=0.0)
    acfg = AlgoConfig(loss_agg=loss_agg, lr=1e-3, clip_low=0.2, clip_high=0.28)
    eng = TrainEngine(tiny_model(tok, seed), tcfg, acfg)
    n_mb = len(eng.micro_batches(batch.trajectories, share_prompt=tcfg.share_prompt))
    m = eng.step(batch)
    grads = {k: p.grad.detach().clone() for k, p in eng.model.named_parameters()}
    return grads, m, n_mb


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_gradient_independent_of_micro_batch_split(tok, loss_agg, packing):
    batch = make_batch(len(tok))
    longest = max(len(t.tokens) for t in batch.trajectories)
    whole, m1, n1 = grads_after_step(tok, batch, 4096, loss_agg, packing)
    # a budget that forces exactly four micro-batches
    def count(b: int) -> int:
        if packing:
            return len(make_micro_batches(batch.trajectories, b, share_prompt=True))
        return len(split_by_tokens([len(t.tokens) for t in batch.trajectories], b))

    budget = next(b for b in range(longest, 4096) if count(b) == 4)
    split, m4, n4 = grads_after_step(tok, batch, budget, loss_agg, packing)
    assert (n1, n4) == (1, 4)
    total = torch.sqrt(sum((g ** 2).sum() for g in whole.values()))
    assert total > 1e-3  # a real gradient, not zeros on both sides
    assert whole.keys() == split.keys()
    diff = max(float((whole[k] - split[k]).abs().max()) for k in whole)
    assert diff <= TOL, f"max |grad(1 mb) - grad(4 mbs)| = {diff:.2e}"
    assert abs(m1["loss/policy"] - m4["loss/policy"]) <= TOL
    assert abs(m1["grad/norm"] - m4["grad/norm"]) <= TOL * max(1.0, m1["grad/norm"])


def test_local_normaliser_would_be_caught(tok, monkeypatch):
    """Control: token-mean divided by each micro-batch's own token count (the classic bug) gives a gradient that
    depends on the split by far more than TOL, so the test above can tell the two apart."""
    from thinkrl.algo import registry

    def local_token_mean(per_token, inp, cfg=None):
        return (per_token * inp.mask).sum() / inp.mask.sum().clamp(min=1.0)

    monkeypatch.setitem(registry.LOSS_AGGS, "token-mean", local_token_mean)
    batch = make_batch(len(tok))
    whole, _, _ = grads_after_step(tok, batch, 4096, "token-mean")
    longest = max(len(t.tokens) for t in batch.trajectories)
    split, _, n = grads_after_step(tok, batch, longest, "token-mean")
    assert n > 1
    diff = max(float((whole[k] - split[k]).abs().max()) for k in whole)
    assert diff > 100 * TOL
