"""Advantage estimators against hand-computed values, plus group-baseline properties."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from thinkrl.algo import get_advantage, registered_advantages
from thinkrl.algo.advantages import gae_advantages_and_returns, gae_returns, last_token_rewards
from thinkrl.algo.config import AlgoConfig

D = torch.float64


def t(x, dtype=D):
    return torch.tensor(x, dtype=dtype)


def adv(name, rewards, groups, mask, cfg=None, values=None):
    return get_advantage(name)(t(rewards), t(groups, torch.long), t(mask), cfg or AlgoConfig(), values)


def test_grpo_hand_values():
    # group 7: [1, 0, 0, 1] mean .5, unbiased std sqrt(1/3); group 2: a single answer -> 0
    mask = [[1, 1, 0], [0, 1, 1], [1, 0, 0], [1, 1, 1], [1, 1, 0]]
    a = adv("grpo", [1, 0, 0, 1, 3.0], [7, 7, 7, 7, 2], mask)
    z = 0.5 / math.sqrt(1 / 3)
    expected = t([[z, z, 0], [0, -z, -z], [-z, 0, 0], [z, z, z], [0, 0, 0]])
    assert torch.allclose(a, expected, atol=1e-5)


def test_grpo_without_std_is_dr_grpo():
    cfg = AlgoConfig(norm_std=False)
    mask = [[1, 1]] * 3
    a = adv("grpo", [1, 0, 0], [0, 0, 0], mask, cfg)
    b = adv("dr_grpo", [1, 0, 0], [0, 0, 0], mask)
    assert torch.allclose(a, b)
    assert torch.allclose(b[:, 0], t([2 / 3, -1 / 3, -1 / 3]))


def test_rloo_hand_values():
    # leave-one-out baselines: 1 - mean(0, 0) = 1; 0 - mean(1, 0) = -.5; singleton group -> 0
    a = adv("rloo", [1, 0, 0, 5], [0, 0, 0, 1], [[1, 1]] * 4)
    assert torch.allclose(a[:, 1], t([1.0, -0.5, -0.5, 0.0]))


def test_reinforce_pp_whitens_over_batch_tokens():
    # token values [1 | 0 0 0]: mean .25, population std sqrt(.1875)
    mask = [[1, 0, 0], [1, 1, 1]]
    a = adv("reinforce_pp", [1, 0], [0, 1], mask)
    s = math.sqrt(0.1875)
    assert torch.allclose(a, t([[0.75 / s, 0, 0], [-0.25 / s] * 3]), atol=1e-6)
    # the baseline variant subtracts the group mean first: [.5 | -.5 -.5 -.5] -> same whitened values
    b = adv("reinforce_pp_baseline", [1, 0], [0, 0], mask)
    assert torch.allclose(b, a, atol=1e-6)


def test_gae_hand_values():
    values = t([[9.0, 0.5, 0.8]])
    mask = t([[0.0, 1.0, 1.0]])
    r = last_token_rewards(t([1.0]), mask)
    assert r.tolist() == [[0.0, 0.0, 1.0]]
    a, ret = gae_advantages_and_returns(r, values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(a, t([[0.0, 0.5, 0.2]]))  # A_t = R - V_t
    assert torch.allclose(ret, t([[0.0, 1.0, 1.0]]))
    # gamma .9, lam .5: A2 = 1 - .8 = .2; A1 = (.9 * .8 - .5) + .45 * .2 = .31; R1 = .81
    a, ret = gae_advantages_and_returns(r, values, mask, gamma=0.9, lam=0.5)
    assert torch.allclose(a, t([[0.0, 0.31, 0.2]]))
    assert torch.allclose(ret, t([[0.0, 0.81, 1.0]]))


def test_gae_skips_non_model_tokens_between_turns():
    values, mask = t([[0.5, 7.0, 0.8]]), t([[1.0, 0.0, 1.0]])
    cfg = AlgoConfig(gamma=1.0, lam=1.0, adv_whiten=False)
    a = get_advantage("gae")(t([1.0]), t([0], torch.long), mask, cfg, values)
    assert torch.allclose(a, t([[0.5, 0.0, 0.2]]))
    ret = gae_returns(t([1.0]), t([0], torch.long), mask, cfg, values)
    assert torch.allclose(ret, t([[1.0, 0.0, 1.0]]))


def test_gae_needs_values():
    with pytest.raises(ValueError, match="values"):
        adv("gae", [1.0], [0], [[1, 1]])


def test_gae_whitening():
    values = t([[0.0, 0.0], [0.0, 0.0]])
    a = adv("gae", [1.0, 0.0], [0, 0], [[1, 1], [1, 1]], AlgoConfig(), values)
    assert torch.allclose(a, t([[1.0, 1.0], [-1.0, -1.0]]), atol=1e-6)


def test_ppo_critic_free():
    mask = [[1, 1, 1, 0], [0, 1, 1, 1]]
    cfg = AlgoConfig(gamma=1.0, lam=1.0, adv_whiten=False)
    a = adv("ppo_critic_free", [5.0, -5.0], [0, 1], mask, cfg)
    assert torch.allclose(a, t([[5.0, 5, 5, 0], [0, -5, -5, -5]]))  # every token gets the return
    cfg = AlgoConfig(gamma=0.5, lam=1.0, adv_whiten=False)
    a = adv("ppo_critic_free", [4.0, 0.0], [0, 1], mask, cfg)
    assert torch.allclose(a[0], t([1.0, 2.0, 4.0, 0.0]))  # (gamma lam)^k r
    # with whitening and gamma = lam = 1 it coincides with REINFORCE++
    r, m = [1.0, 0.0, 0.0], [[1, 1, 0], [1, 0, 0], [1, 1, 1]]
    assert torch.allclose(adv("ppo_critic_free", r, [0, 0, 1], m), adv("reinforce_pp", r, [0, 0, 1], m))


def test_empty_response_row_and_dtype():
    for name in registered_advantages():
        vals = torch.zeros(2, 3) if name == "gae" else None
        a = get_advantage(name)(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), torch.tensor([[1.0, 1, 0], [0, 0, 0]]), AlgoConfig(), vals)
        assert a.dtype == torch.float32 and a.shape == (2, 3)
        assert torch.isfinite(a).all() and (a[1] == 0).all() and a[0, 2] == 0


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="group_index"):
        get_advantage("grpo")(t([1.0, 0.0]), t([0], torch.long), t([[1.0], [1.0]]), AlgoConfig())
    with pytest.raises(ValueError, match="response_mask"):
        get_advantage("grpo")(t([1.0, 0.0]), t([0, 0], torch.long), t([1.0, 1.0]), AlgoConfig())
    with pytest.raises(ValueError, match="non-negative"):
        get_advantage("grpo")(t([1.0, 0.0]), t([0, -1], torch.long), t([[1.0], [1.0]]), AlgoConfig())


# half-integer rewards: a group std is 0 or >= ~0.2, so GRPO's eps cannot break scale invariance
rewards_st = st.lists(st.integers(-10, 10).map(lambda k: k / 2), min_size=2, max_size=12)


@settings(max_examples=40, deadline=None)
@given(rewards_st, st.integers(1, 4), st.floats(0.1, 10), st.floats(-3, 3))
def test_group_baselines_centre_groups_and_ignore_affine_shifts(rs, n_groups, scale, shift):
    g = torch.tensor([i % n_groups for i in range(len(rs))])
    r = torch.tensor(rs, dtype=D)
    mask = torch.ones(len(rs), 2, dtype=D)
    for name in ("grpo", "dr_grpo", "rloo"):
        a = get_advantage(name)(r, g, mask, AlgoConfig())[:, 0]
        sums = torch.zeros(n_groups, dtype=D).index_add_(0, g, a)
        assert torch.allclose(sums, torch.zeros_like(sums), atol=1e-6)  # zero-mean within each group
        b = get_advantage(name)(r + shift, g, mask, AlgoConfig())[:, 0]
        assert torch.allclose(a, b, atol=1e-6)  # a constant reward shift changes nothing
    a = get_advantage("grpo")(r, g, mask, AlgoConfig())
    b = get_advantage("grpo")(r * scale, g, mask, AlgoConfig())
    assert torch.allclose(a, b, atol=1e-3)  # GRPO is also scale-invariant (up to eps)
