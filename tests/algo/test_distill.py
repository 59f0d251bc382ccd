"""On-policy distillation's advantage (thinkrl.algo.distill), its place in make_batch, and its config checks."""
from __future__ import annotations

import math

import pytest
import torch

from thinkrl.algo.batch import make_batch
from thinkrl.algo.config import AlgoConfig
from thinkrl.algo.distill import distill_advantages, distill_metrics
from thinkrl.config import ConfigError, load_config
from thinkrl.types import Trajectory


def test_k1_advantage_by_hand():
    # one row, tokens 0..3: the prompt (t = 0) off the mask
    ver = torch.tensor([[0.0, 0.5, 0.5, 0.5]])
    stu = torch.tensor([[0.0, -0.1, -2.0, -0.5]])
    tea = torch.tensor([[0.0, -0.3, -0.5, -0.5]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    adv = distill_advantages(ver, stu, tea, mask, distill_coef=2.0, verifier_coef=0.5)
    # 0.5 * 0.5 - 2 * (s - t): t=1: 0.25 - 2 * 0.2 = -0.15; t=2: 0.25 - 2 * (-1.5) = 3.25; t=3: 0.25
    assert adv.tolist()[0] == pytest.approx([0.0, -0.15, 3.25, 0.25])


def test_pure_distillation_is_teacher_minus_student():
    stu = torch.tensor([[-1.0, -2.0], [-0.5, -0.25]])
    tea = torch.tensor([[-1.5, -0.5], [-0.5, -4.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = distill_advantages(torch.full((2, 2), 7.0), stu, tea, mask, distill_coef=1.0, verifier_coef=0.0)
    assert adv.tolist() == [[-0.5, 1.5], [0.0, 0.0]]


def test_k3_term_is_a_penalty_zero_where_teacher_agrees():
    torch.manual_seed(0)
    stu, tea = -torch.rand(3, 5) * 3, -torch.rand(3, 5) * 3
    mask = torch.ones(3, 5)
    ver = torch.randn(3, 5)
    adv = distill_advantages(ver, stu, tea, mask, 1.0, 1.0, estimator="k3")
    assert (adv <= ver + 1e-6).all()  # k3 >= 0
    same = distill_advantages(ver, stu, stu.clone(), mask, 1.0, 1.0, estimator="k3")
    assert torch.allclose(same, ver)
    # k3 = exp(t - s) - (t - s) - 1 at one token
    d = float(tea[0, 0] - stu[0, 0])
    assert float(ver[0, 0] - adv[0, 0]) == pytest.approx(math.exp(d) - d - 1, abs=1e-6)


def test_shapes_must_agree():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="shapes differ"):
        distill_advantages(x, x, torch.zeros(2, 4), x, 1.0, 1.0)


def test_metrics_are_token_means_on_the_mask():
    stu = torch.tensor([[0.0, -1.0, -3.0]])
    tea = torch.tensor([[-9.0, -2.0, -2.0]])
    m = distill_metrics(stu, tea, torch.tensor([[0.0, 1.0, 1.0]]))
    assert m["distill/reverse_kl"] == pytest.approx(0.0)  # (1 + (-1)) / 2
    assert m["distill/teacher_logp"] == pytest.approx(-2.0)


def _trajs():
    # two groups of two; prompt of 2 tokens, responses of 2 and 3 tokens
    def t(sid, gid, n_resp, reward, lps):
        n = 2 + n_resp
        return Trajectory(sid, gid, list(range(n)), [False, False] + [True] * n_resp, [0.0, 0.0] + lps,
                          [-1, -1] + [0] * n_resp, reward=reward, prompt_len=2)

    return [t("a0", "a", 2, 1.0, [-0.5, -0.5]), t("a1", "a", 3, 0.0, [-1.0, -1.0, -1.0]),
            t("b0", "b", 2, 1.0, [-0.2, -0.4]), t("b1", "b", 2, 1.0, [-0.3, -0.3])]


def test_make_batch_adds_the_teacher_term_to_the_verifier_advantage():
    trajs = _trajs()
    teacher = [[0.0, 0.0, -1.0, -0.5], [0.0, 0.0, -1.0, -2.0, -0.5], [0.0, 0.0, -0.2, -0.4], [0.0, 0.0, -1.3, -0.3]]
    plain = make_batch(trajs, AlgoConfig(), 8)
    acfg = AlgoConfig(distill_teacher="teacher/dir", distill_coef=0.5, distill_verifier_coef=1.0)
    b = make_batch(trajs, acfg, 8, teacher_logprobs=teacher)
    for i, t in enumerate(trajs):
        want = [(pa + 0.5 * (tl - sl)) if m else 0.0
                for pa, tl, sl, m in zip(plain.advantages[i], teacher[i], t.logprobs, t.loss_mask)]
        assert b.advantages[i] == pytest.approx(want)
    # group b is all correct: its GRPO advantage is 0, the teacher's term alone remains (b1's first token: -0.5)
    assert b.advantages[3][2] == pytest.approx(0.5 * (-1.3 + 0.3))
    # reverse KL per token, mean over the 9 response tokens: sum(s - t) / 9
    s_minus_t = [0.5, 0.0, 0.0, 1.0, -0.5, 0.0, 0.0, 1.0, 0.0]
    assert b.metrics["distill/reverse_kl"] == pytest.approx(sum(s_minus_t) / 9)
    assert "distill/reverse_kl" not in plain.metrics


def test_make_batch_needs_the_teacher_logprobs():
    with pytest.raises(ValueError, match="teacher's log-probs"):
        make_batch(_trajs(), AlgoConfig(distill_teacher="x"), 8)


@pytest.mark.parametrize("override, match", [
    ("algo.distill_estimator=k9", "algo.distill_estimator"),
    ("algo.distill_coef=0", "algo.distill_coef"),
    ("algo.distill_verifier_coef=-1", "algo.distill_verifier_coef"),
])
def test_bad_values_fail_at_load(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["algo.distill_teacher=t", override])


def test_unsupported_combinations_fail_at_load():
    with pytest.raises(ConfigError, match="train.packing"):
        load_config(None, ["algo.distill_teacher=t", "train.packing=false"])
    with pytest.raises(ConfigError, match="Ray backend has no teacher"):
        load_config(None, ["algo.distill_teacher=t", "cluster.backend=ray"])
    with pytest.raises(ConfigError, match="mask_uniform_groups"):
        load_config(None, ["algo.distill_teacher=t", "algo.distill_verifier_coef=0", "algo.mask_uniform_groups=true"])
    load_config(None, ["algo.distill_teacher=t", "algo.distill_verifier_coef=0"])  # pure distillation loads
