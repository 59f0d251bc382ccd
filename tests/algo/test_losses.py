"""Policy losses against hand-computed values, plus PPO properties."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from thinkrl.algo import get_loss, registered_losses
from thinkrl.algo.config import AlgoConfig
from thinkrl.algo.losses import LossInput, reduce_metrics, value_loss

D = torch.float64


def make(ratios, adv, seq_ids=None, old=None, behav=None, ref=None, entropy=None, mask=None, max_len=0.0):
    """LossInput of one micro-batch holding the whole batch, with logp = old + log(ratio)."""
    n = len(ratios)
    old_t = torch.tensor(old if old is not None else [-1.0] * n, dtype=D)
    logp = (old_t + torch.log(torch.tensor(ratios, dtype=D))).requires_grad_(True)
    m = torch.tensor(mask if mask is not None else [1.0] * n, dtype=D)
    ids = torch.tensor(seq_ids if seq_ids is not None else list(range(n)))
    opt = lambda x: None if x is None else torch.tensor(x, dtype=D)  # noqa: E731
    return LossInput(logp=logp, old_logp=old_t, advantages=torch.tensor(adv, dtype=D), mask=m, seq_ids=ids,
                     num_tokens=float(m.sum()), num_seqs=float(len(set(ids.tolist()))), behav_logp=opt(behav),
                     ref_logp=opt(ref), entropy=opt(entropy), max_len=max_len)


def test_ppo_hand_values():
    # ratio 1.5, A=+1 -> clipped -1.2 | .5, +1 -> -.5 | 1.1, -1 -> 1.1 | .7, -1 -> clipped .8
    inp = make([1.5, 0.5, 1.1, 0.7], [1.0, 1.0, -1.0, -1.0])
    loss, m = get_loss("ppo")(inp, AlgoConfig())
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1 + 0.8) / 4)
    assert m["clip/frac"] == pytest.approx(0.5)
    assert m["is/ratio_max"] == pytest.approx(1.5)
    assert m["loss/policy"] == pytest.approx(loss.item())
    loss.backward()
    # d/dlogp of -A r is -A r on unclipped tokens, 0 on clipped ones; token-mean divides by 4
    assert torch.allclose(inp.logp.grad, torch.tensor([0.0, -0.5, 1.1, 0.0], dtype=D) / 4)


def test_clip_higher_is_asymmetric():
    inp = make([1.25, 1.25], [1.0, 1.0])
    loss, m = get_loss("ppo")(inp, AlgoConfig(clip_low=0.2, clip_high=0.28))
    assert loss.item() == pytest.approx(-1.25) and m["clip/frac"] == 0.0
    inp = make([0.75], [-1.0])
    loss, m = get_loss("ppo")(inp, AlgoConfig(clip_low=0.2, clip_high=0.28))
    assert loss.item() == pytest.approx(0.8) and m["clip/frac"] == 1.0


def test_dual_clip_bounds_negative_advantages():
    cfg = AlgoConfig(dual_clip=3.0)
    inp = make([5.0, 5.0, 2.0], [-1.0, 1.0, -2.0])
    loss, m = get_loss("ppo")(inp, cfg)
    # A=-1, r=5: min(max(5, 1.2), 3) = 3 | A=+1: clipped -1.2 | A=-2, r=2: 4 < 6, not dual-clipped
    assert loss.item() == pytest.approx((3.0 - 1.2 + 4.0) / 3)
    assert m["clip/dual_frac"] == pytest.approx(1 / 3)
    loss.backward()
    assert inp.logp.grad[0] == 0.0  # the bound is a constant
    plain, _ = get_loss("ppo")(make([5.0], [-1.0]), AlgoConfig())
    assert plain.item() == pytest.approx(5.0)  # without dual clip the loss grows with the ratio


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-100, -1e-3), min_size=1, max_size=8), st.floats(1.5, 20), st.floats(1.01, 5))
def test_dual_clip_bound_holds(advs, log_ratio_scale, c):
    ratios = [math.exp(log_ratio_scale * (i % 3)) for i in range(len(advs))]
    inp = make(ratios, advs)
    loss, _ = get_loss("ppo")(inp, AlgoConfig(dual_clip=c))
    assert loss.item() <= c * sum(-a for a in advs) / len(advs) + 1e-9


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-10, 10), min_size=1, max_size=10), st.floats(0.0, 0.5), st.floats(0.0, 0.5))
def test_ratio_one_is_the_unclipped_policy_gradient(advs, lo, hi):
    # at ratio 1 every loss (cispo and sapo included) has the gradient of -A r: -A / num_tokens per token
    for name in registered_losses():
        inp = make([1.0] * len(advs), advs, behav=[-1.0] * len(advs))
        dual = 2.0 if name in ("ppo", "decoupled_ppo", "gspo") else 0.0
        loss, m = get_loss(name)(inp, AlgoConfig(loss=name, clip_low=lo, clip_high=hi, dual_clip=dual))
        assert m["clip/frac"] == 0.0
        if name != "sapo":  # sapo's value at r = 1 is -(2 / tau) A: only its gradient is the policy gradient's
            assert loss.item() == pytest.approx(-sum(advs) / len(advs), abs=1e-9)
        loss.backward()
        assert torch.allclose(inp.logp.grad, -torch.tensor(advs, dtype=D) / len(advs), atol=1e-12), name


@pytest.mark.parametrize("name", ["ppo", "decoupled_ppo", "gspo", "cispo", "sapo"])
def test_zero_advantage_zero_gradient(name):
    inp = make([1.3, 0.6, 1.0, 2.0], [0.0] * 4, seq_ids=[0, 0, 1, 1], behav=[-1.2, -0.9, -1.0, -1.5])
    cfg = AlgoConfig(loss=name, dual_clip=3.0, rollout_correction="tis_token" if name != "decoupled_ppo" else "none")
    loss, _ = get_loss(name)(inp, cfg)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(inp.logp.grad, torch.zeros(4, dtype=D))


def test_decoupled_ppo_reduces_to_ppo_when_behaviour_is_proximal():
    args = dict(ratios=[1.5, 0.5, 1.1, 0.7, 1.0], adv=[1.0, 1.0, -1.0, -1.0, 2.0], old=[-1.0, -2.0, -0.5, -3.0, -1.0])
    a, b = make(**args), make(**args, behav=args["old"])
    la, ma = get_loss("ppo")(a, AlgoConfig())
    lb, mb = get_loss("decoupled_ppo")(b, AlgoConfig(loss="decoupled_ppo", behav_weight_cap=5.0))
    la.backward()
    lb.backward()
    assert lb.item() == pytest.approx(la.item())
    assert torch.allclose(a.logp.grad, b.logp.grad)
    assert mb["is/behav_weight_max"] == pytest.approx(1.0) and mb["is/behav_masked_frac"] == 0.0


def test_decoupled_ppo_behaviour_weight_and_cap():
    # ratio 1 against the proximal policy; behaviour weights exp(old - behav) = 2 and 8
    old = [-1.0, -1.0]
    behav = [-1.0 - math.log(2.0), -1.0 - math.log(8.0)]
    inp = make([1.0, 1.0], [1.0, 1.0], old=old, behav=behav)
    loss, m = get_loss("decoupled_ppo")(inp, AlgoConfig(loss="decoupled_ppo"))
    assert loss.item() == pytest.approx(-(2.0 + 8.0) / 2)
    assert m["is/behav_weight_max"] == pytest.approx(8.0)
    inp = make([1.0, 1.0], [1.0, 1.0], old=old, behav=behav)
    loss, m = get_loss("decoupled_ppo")(inp, AlgoConfig(loss="decoupled_ppo", behav_weight_cap=5.0))
    assert loss.item() == pytest.approx(-2.0 / 2)  # the token above the cap is dropped, still counted
    assert m["is/behav_masked_frac"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="behav_logp"):
        get_loss("decoupled_ppo")(make([1.0], [1.0]), AlgoConfig())


def test_tis_token_and_sequence():
    # trainer/engine log-ratios: seq 0 tokens log 3 and log .5, seq 1 token log 1.5
    old = [-1.0, -1.0, -1.0]
    behav = [-1.0 - math.log(3.0), -1.0 - math.log(0.5), -1.0 - math.log(1.5)]
    adv = [1.0, 1.0, 1.0]
    loss, m = get_loss("ppo")(make([1.0] * 3, adv, [0, 0, 1], old, behav), AlgoConfig(rollout_correction="tis_token", tis_cap=2.0))
    assert loss.item() == pytest.approx(-(2.0 + 0.5 + 1.5) / 3)  # min(3, 2), .5, 1.5
    assert m["is/tis_max"] == pytest.approx(3.0) and m["is/tis_clip_frac"] == pytest.approx(1 / 3)
    loss, m = get_loss("ppo")(make([1.0] * 3, adv, [0, 0, 1], old, behav), AlgoConfig(rollout_correction="tis_sequence", tis_cap=2.0))
    assert loss.item() == pytest.approx(-(1.5 + 1.5 + 1.5) / 3)  # seq 0: 3 * .5 = 1.5; seq 1: 1.5
    loss, _ = get_loss("ppo")(make([1.0] * 3, adv, [0, 0, 1], old, behav), AlgoConfig(rollout_correction="tis_sequence", tis_cap=1.2))
    assert loss.item() == pytest.approx(-1.2)
    with pytest.raises(ValueError, match="behav_logp"):
        get_loss("ppo")(make([1.0], [1.0]), AlgoConfig(rollout_correction="tis_token"))


def test_gspo_sequence_ratio():
    # seq 0: token log-ratios .1, .3 -> s = e^.2 > 1.2 -> clipped at 1.2; seq 1: log-ratio -.1 -> s = e^-.1
    ratios = [math.exp(0.1), math.exp(0.3), math.exp(-0.1)]
    cfg = AlgoConfig(loss="gspo", loss_agg="seq-mean-token-mean", clip_low=0.2, clip_high=0.2)
    inp = make(ratios, [1.0, 1.0, 1.0], seq_ids=[0, 0, 1])
    loss, m = get_loss("gspo")(inp, cfg)
    assert loss.item() == pytest.approx((-1.2 - math.exp(-0.1)) / 2)
    assert m["clip/frac"] == pytest.approx(2 / 3)
    assert m["is/ratio_max"] == pytest.approx(math.exp(0.2))
    loss.backward()
    # gradient of the sequence objective -A exp(mean_t log r_t) / num_seqs for the unclipped sequence
    assert torch.allclose(inp.logp.grad, torch.tensor([0.0, 0.0, -math.exp(-0.1) / 2], dtype=D))
    # unclipped two-token sequence: d/dlogp_t = -A s / |y| / num_seqs
    inp = make([math.exp(0.05), math.exp(-0.05)], [2.0, 2.0], seq_ids=[0, 0])
    loss, _ = get_loss("gspo")(inp, cfg)
    loss.backward()
    assert torch.allclose(inp.logp.grad, torch.tensor([-1.0, -1.0], dtype=D))


def test_cispo_hand_values():
    # ratios 1.5 (A=+1), .5 (A=+1), 1.1 (A=-1) with the IS weight clipped to [0, 1.28] (clip_low 1: no lower bound)
    cfg = AlgoConfig(loss="cispo", clip_low=1.0, clip_high=0.28)
    inp = make([1.5, 0.5, 1.1], [1.0, 1.0, -1.0])
    loss, m = get_loss("cispo")(inp, cfg)
    assert loss.item() == pytest.approx((-1.28 - 0.5 + 1.1) / 3)  # value -w A per token
    assert m["clip/frac"] == pytest.approx(1 / 3) and m["is/ratio_max"] == pytest.approx(1.5)
    loss.backward()
    # every token keeps its gradient: d/dlogp = -sg(w) A / num_tokens, the clipped token too (PPO would give 0)
    assert torch.allclose(inp.logp.grad, torch.tensor([-1.28, -0.5, 1.1], dtype=D) / 3)
    ppo_inp = make([1.5, 0.5, 1.1], [1.0, 1.0, -1.0])
    get_loss("ppo")(ppo_inp, AlgoConfig(clip_high=0.28))[0].backward()
    assert ppo_inp.logp.grad[0] == 0.0


def test_sapo_soft_gate():
    # f(r) = sigmoid(tau (r - 1)) * 4 / tau; l = -f(r) A; tau = 1 for A > 0, 2 for A < 0
    cfg = AlgoConfig(loss="sapo", sapo_tau_pos=1.0, sapo_tau_neg=2.0)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    inp = make([1.5, 0.5, 2.0], [1.0, 2.0, -1.0])
    loss, m = get_loss("sapo")(inp, cfg)
    f = [sig(0.5) * 4, sig(-0.5) * 4, sig(2.0) * 2]
    assert loss.item() == pytest.approx((-f[0] - 2 * f[1] + f[2]) / 3)
    assert m["clip/frac"] == 0.0
    loss.backward()
    # d/dlogp = -A f'(r) r, f'(r) = 4 sigmoid'(tau (r - 1)); the gate decays smoothly (no hard zero)
    dsig = lambda x: sig(x) * (1 - sig(x))  # noqa: E731
    want = [-1.0 * 4 * dsig(0.5) * 1.5, -2.0 * 4 * dsig(-0.5) * 0.5, 1.0 * 4 * dsig(2.0) * 2.0]
    assert torch.allclose(inp.logp.grad, torch.tensor(want, dtype=D) / 3)
    # far from 1 the gradient vanishes (soft trust region), larger tau faster
    far = make([8.0], [1.0])
    get_loss("sapo")(far, cfg)[0].backward()
    assert 0 < -far.logp.grad.item() < 0.05  # 4 sigmoid'(7) * 8 = 0.029; the unclipped gradient is 8


def test_kl_in_loss_and_entropy_bonus():
    ref = [-1.5, -0.5]
    inp = make([1.0, 1.0], [1.0, -1.0], ref=ref, entropy=[2.0, 4.0])
    loss, m = get_loss("ppo")(inp, AlgoConfig(kl_coef=0.1, kl_estimator="k1", entropy_coef=0.01))
    kl = ((-1.0 + 1.5) + (-1.0 + 0.5)) / 2  # k1 = logp - ref
    assert loss.item() == pytest.approx(0.0 + 0.1 * kl - 0.01 * 3.0)
    assert m["kl/mean"] == pytest.approx(kl) and m["entropy/mean"] == pytest.approx(3.0)
    # coefficients 0 (defaults): both still reported, neither in the loss
    loss, m = get_loss("ppo")(make([1.0, 1.0], [1.0, -1.0], ref=ref, entropy=[2.0, 4.0]), AlgoConfig(kl_estimator="k1"))
    assert loss.item() == 0.0 and m["entropy/mean"] == pytest.approx(3.0) and "kl/mean" in m
    # KL placed in the reward: not in the loss
    loss, _ = get_loss("ppo")(make([1.0, 1.0], [1.0, -1.0], ref=ref), AlgoConfig(kl_coef=0.1, kl_in_reward=True))
    assert loss.item() == 0.0
    with pytest.raises(ValueError, match="ref_logp"):
        get_loss("ppo")(make([1.0], [1.0]), AlgoConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="entropy"):
        get_loss("ppo")(make([1.0], [1.0]), AlgoConfig(entropy_coef=0.1))


def test_masked_tokens_ignored():
    inp = make([1.0, 50.0, 1.0], [1.0, 7.0, 3.0], mask=[1.0, 0.0, 1.0])
    loss, m = get_loss("ppo")(inp, AlgoConfig())
    assert loss.item() == pytest.approx(-2.0) and m["is/ratio_max"] == pytest.approx(1.0)


def test_value_loss():
    v = torch.tensor([1.0, 2.0, 0.0], dtype=D, requires_grad=True)
    ret = torch.tensor([2.0, 2.0, 5.0], dtype=D)
    loss, _ = value_loss(v, ret, torch.tensor([1.0, 1.0, 0.0], dtype=D), num_tokens=2)
    assert loss.item() == pytest.approx(0.5 * 1.0 / 2)
    old = torch.tensor([0.0, 2.0, 0.0], dtype=D)
    loss, m = value_loss(v, ret, torch.tensor([1.0, 1.0, 0.0], dtype=D), 2, old_values=old, clip=0.5)
    assert loss.item() == pytest.approx(0.5 * (1.5 ** 2) / 2)  # clipped value .5 is further from 2
    assert m["value/clip_frac"] == pytest.approx(0.5)


def test_reduce_metrics():
    out = reduce_metrics([{"clip/frac": 0.25, "is/ratio_max": 1.5, "x_min": 0.9},
                          {"clip/frac": 0.5, "is/ratio_max": 1.2, "x_min": 0.7}])
    assert out == {"clip/frac": 0.75, "is/ratio_max": 1.5, "x_min": 0.7}
