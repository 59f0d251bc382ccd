"""KL estimators between the current policy and a reference, per token (Schulman 2020,
"Approximating KL divergence"), and the two ways to use them:

- in the loss: `kl_coef * agg(k(logp, ref_logp))`, done by the policy losses when kl_coef > 0
  and `kl_in_reward` is false (GRPO, DeepSeekMath; the default estimator k3);
- in the reward: `kl_in_reward` below, before the advantage (InstructGPT, REINFORCE++).

With samples from the current policy pi and r = ref / pi: k1 = -log r (unbiased, high variance),
k2 = (log r)^2 / 2 (biased, low variance), k3 = r - 1 - log r (unbiased, low variance, >= 0).
"""
from __future__ import annotations

import torch

from thinkrl.algo.registry import get_kl, register_kl


@register_kl("k1")
def k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = log pi - log ref."""
    return logp - ref_logp


@register_kl("k2")
def k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = (log pi - log ref)^2 / 2."""
    return 0.5 * (logp - ref_logp) ** 2


@register_kl("k3")
def k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = exp(log ref - log pi) - (log ref - log pi) - 1 (log-ratio clamped to +-20)."""
    d = (ref_logp - logp).clamp(-20, 20)
    return torch.exp(d) - d - 1.0


def kl_in_reward(
    rewards: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, response_mask: torch.Tensor,
    coef: float, estimator: str = "k1",
) -> torch.Tensor:
    """Sequence rewards with the KL penalty folded in: r_i - coef * sum_t k(logp_it, ref_it) * m_it.

    `logp` are the sampling (behaviour/old) log-probs, no gradient; all per-token tensors are [B, T]
    and aligned with the tokens. This is the gamma = 1 return of the per-token KL reward of
    InstructGPT (Ouyang et al. 2022) seen from the first response token. coef = 0 returns `rewards`.
    """
    if coef == 0:
        return rewards
    k = get_kl(estimator)(logp.detach(), ref_logp.detach())
    penalty = (k * response_mask).sum(dim=1)
    return rewards - coef * penalty.to(rewards.dtype)
