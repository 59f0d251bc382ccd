"""KL estimators and the KL-in-reward helper against hand-computed values."""
from __future__ import annotations

import math

import torch

from thinkrl.algo import get_kl
from thinkrl.algo.kl import kl_in_reward

D = torch.float64


def test_estimators_hand_values():
    logp, ref = torch.tensor([-1.0, -2.0], dtype=D), torch.tensor([-1.5, -1.0], dtype=D)
    assert torch.allclose(get_kl("k1")(logp, ref), torch.tensor([0.5, -1.0], dtype=D))
    assert torch.allclose(get_kl("k2")(logp, ref), torch.tensor([0.125, 0.5], dtype=D))
    # k3 = e^d - d - 1 with d = ref - logp
    expected = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]
    assert torch.allclose(get_kl("k3")(logp, ref), torch.tensor(expected, dtype=D))


def test_k3_nonnegative_and_zero_at_equality():
    g = torch.Generator().manual_seed(0)
    logp, ref = -torch.rand(100, generator=g) * 5, -torch.rand(100, generator=g) * 5
    assert (get_kl("k3")(logp, ref) >= 0).all()
    for name in ("k1", "k2", "k3"):
        assert torch.equal(get_kl(name)(logp, logp), torch.zeros(100))


def test_kl_in_reward():
    rewards = torch.tensor([1.0, 0.0], dtype=D)
    logp = torch.tensor([[-1.0, -1.0, -9.0], [-2.0, -1.0, -1.0]], dtype=D)
    ref = torch.tensor([[-1.5, -1.5, 0.0], [-1.0, -1.0, -1.0]], dtype=D)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=D)
    out = kl_in_reward(rewards, logp, ref, mask, coef=0.1, estimator="k1")
    assert torch.allclose(out, torch.tensor([1.0 - 0.1 * 1.0, 0.0 - 0.1 * -1.0], dtype=D))
    assert kl_in_reward(rewards, logp, ref, mask, coef=0.0) is rewards
