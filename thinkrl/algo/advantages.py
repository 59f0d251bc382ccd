"""Advantage estimators.

Signature of every estimator:

    fn(rewards: Tensor[B], group_index: Tensor[B] (long), response_mask: Tensor[B, T] (float),
       cfg: AlgoConfig, values: Tensor[B, T] | None = None) -> Tensor[B, T]

`rewards` are sequence rewards (already shaped: see `thinkrl.algo.shaping.shape_rewards`),
`group_index` says which prompt each response belongs to (the n answers of a prompt share an
index; any non-negative integers), `response_mask` is 1 on the model's tokens. The result is a
per-token advantage, 0 where the mask is 0. Token alignment: `values[b, t]` estimates the return
from the state just before token t (the same alignment as `logprob[t] = log p(tokens[t] | tokens[:t])`).

Statistics are computed in float64 (float32 on MPS) and returned in the rewards' dtype.
"""
from __future__ import annotations

import torch

from thinkrl.algo.registry import register_advantage


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.device.type == "mps" else torch.float64


def _check(rewards: torch.Tensor, group_index: torch.Tensor, response_mask: torch.Tensor) -> None:
    if rewards.dim() != 1 or group_index.shape != rewards.shape:
        raise ValueError(f"rewards and group_index must both be [B], got {tuple(rewards.shape)} and {tuple(group_index.shape)}")
    if response_mask.dim() != 2 or response_mask.shape[0] != rewards.shape[0]:
        raise ValueError(f"response_mask must be [B, T] with B={rewards.shape[0]}, got {tuple(response_mask.shape)}")
    if group_index.dtype not in (torch.int32, torch.int64) or (group_index.numel() and int(group_index.min()) < 0):
        raise ValueError("group_index must hold non-negative integers (long)")


def group_stats(rewards: torch.Tensor, group_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample group mean, group std (unbiased, 0 for groups of one) and group size."""
    group_index = group_index.long()
    num_groups = int(group_index.max().item()) + 1 if group_index.numel() else 0
    dt, dev = _acc_dtype(rewards), rewards.device
    r = rewards.to(dt)
    count = torch.zeros(num_groups, dtype=dt, device=dev).index_add_(0, group_index, torch.ones_like(r))
    total = torch.zeros(num_groups, dtype=dt, device=dev).index_add_(0, group_index, r)
    mean = total / count.clamp(min=1)
    sq = torch.zeros(num_groups, dtype=dt, device=dev).index_add_(0, group_index, (r - mean[group_index]) ** 2)
    std = torch.sqrt(sq / (count - 1).clamp(min=1))
    return mean[group_index], std[group_index], count[group_index]


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / (std + eps) over the positions where mask is 1 (population std); 0 elsewhere."""
    dt = _acc_dtype(x)
    m = mask.to(dt)
    n = m.sum().clamp(min=1)
    xd = x.to(dt)
    mean = (xd * m).sum() / n
    var = (((xd - mean) ** 2) * m).sum() / n
    return ((xd - mean) / (var.sqrt() + eps) * m).to(x.dtype)


def _broadcast(adv_seq: torch.Tensor, rewards: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    return (adv_seq.to(rewards.dtype)[:, None] * response_mask).to(rewards.dtype)


@register_advantage("grpo")
def grpo(rewards, group_index, response_mask, cfg, values=None, eps: float = 1e-6):
    """GRPO (Shao et al. 2024, DeepSeekMath): A_i = (r_i - mean_g) / (std_g + eps) on every token.

    std_g is the unbiased group std; `cfg.norm_std=False` drops the division (= dr_grpo).
    """
    _check(rewards, group_index, response_mask)
    mean, std, _ = group_stats(rewards, group_index)
    adv = rewards.to(mean.dtype) - mean
    if cfg.norm_std:
        adv = adv / (std + eps)
    return _broadcast(adv, rewards, response_mask)


@register_advantage("dr_grpo")
def dr_grpo(rewards, group_index, response_mask, cfg, values=None):
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): A_i = r_i - mean_g.

    No std division (it up-weights too easy / too hard prompts). The paper also removes the 1/|o_i|
    length normaliser: pair it with `loss_agg: seq-mean-token-sum-norm` (a constant normaliser).
    """
    _check(rewards, group_index, response_mask)
    mean, _, _ = group_stats(rewards, group_index)
    return _broadcast(rewards.to(mean.dtype) - mean, rewards, response_mask)


@register_advantage("rloo")
def rloo(rewards, group_index, response_mask, cfg, values=None):
    """RLOO (Kool et al. 2019; Ahmadian et al. 2024): A_i = r_i - mean_{j != i} r_j = n/(n-1) (r_i - mean_g).

    A group of one has no baseline: its advantage is 0.
    """
    _check(rewards, group_index, response_mask)
    mean, _, n = group_stats(rewards, group_index)
    adv = (rewards.to(mean.dtype) - mean) * n / (n - 1).clamp(min=1)
    adv = torch.where(n > 1, adv, torch.zeros_like(adv))
    return _broadcast(adv, rewards, response_mask)


@register_advantage("reinforce_pp")
def reinforce_pp(rewards, group_index, response_mask, cfg, values=None):
    """REINFORCE++ (Hu et al. 2025): A = r broadcast to tokens, then whitened over all response tokens
    of the batch: A_t = (r - mean_batch) / std_batch (global batch normalisation, no group baseline).

    The paper puts a per-token KL penalty in the reward; here use `kl_in_reward` (sequence sum) first.
    """
    _check(rewards, group_index, response_mask)
    return masked_whiten(_broadcast(rewards, rewards, response_mask), response_mask)


@register_advantage("reinforce_pp_baseline")
def reinforce_pp_baseline(rewards, group_index, response_mask, cfg, values=None):
    """REINFORCE++-baseline (Hu et al. 2025): subtract the group mean, then whiten over the batch's tokens."""
    _check(rewards, group_index, response_mask)
    mean, _, _ = group_stats(rewards, group_index)
    centred = _broadcast(rewards.to(mean.dtype) - mean, rewards, response_mask)
    return masked_whiten(centred, response_mask)


def last_token_rewards(rewards: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] token rewards: the sequence reward on the last response token, 0 elsewhere."""
    T = response_mask.shape[1]
    pos = torch.arange(T, device=response_mask.device).expand_as(response_mask)
    last = torch.where(response_mask > 0, pos, torch.full_like(pos, -1)).max(dim=1).values
    out = torch.zeros(response_mask.shape, dtype=rewards.dtype, device=rewards.device)
    has = last >= 0
    out[has.nonzero().squeeze(1), last[has]] = rewards[has]
    return out


def gae_advantages_and_returns(
    token_rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE (Schulman et al. 2016) over the response tokens of each row.

    delta_t = r_t + gamma * V_next - V_t ;  A_t = delta_t + gamma * lam * A_next ;  R_t = A_t + V_t,
    where "next" is the next position with mask 1 (prompt / tool tokens between turns are not
    actions and are skipped) and V after the last response token is 0 (terminal).
    Returns (advantages, returns), both [B, T] and 0 where the mask is 0.
    """
    dt = _acc_dtype(values)
    r, v, m = token_rewards.to(dt), values.to(dt), response_mask.to(dt)
    B, T = m.shape
    adv = torch.zeros(B, T, dtype=dt, device=v.device)
    next_v = torch.zeros(B, dtype=dt, device=v.device)
    next_a = torch.zeros(B, dtype=dt, device=v.device)
    for t in range(T - 1, -1, -1):
        on = m[:, t] > 0
        a = r[:, t] + gamma * next_v - v[:, t] + gamma * lam * next_a
        adv[:, t] = torch.where(on, a, torch.zeros_like(a))
        next_a = torch.where(on, a, next_a)
        next_v = torch.where(on, v[:, t], next_v)
    ret = (adv + v) * m
    return adv.to(values.dtype), ret.to(values.dtype)


def _need_values(values, response_mask, name: str) -> None:
    if values is None:
        raise ValueError(f"advantage {name!r} needs a values tensor [B, T] from a value model; "
                         "use 'ppo_critic_free' for PPO without a critic")
    if values.shape != response_mask.shape:
        raise ValueError(f"values must have the shape of response_mask {tuple(response_mask.shape)}, got {tuple(values.shape)}")


@register_advantage("gae")
def gae(rewards, group_index, response_mask, cfg, values=None):
    """PPO with a critic (Ouyang et al. 2022 style): the sequence reward on the last response token,
    GAE(gamma=cfg.gamma, lambda=cfg.lam) against `values`, whitened over the batch if cfg.adv_whiten.
    The value-loss targets come from `gae_returns` (same arguments)."""
    _check(rewards, group_index, response_mask)
    _need_values(values, response_mask, "gae")
    adv, _ = gae_advantages_and_returns(last_token_rewards(rewards, response_mask), values, response_mask, cfg.gamma, cfg.lam)
    return masked_whiten(adv, response_mask) if cfg.adv_whiten else adv


def gae_returns(rewards, group_index, response_mask, cfg, values) -> torch.Tensor:
    """Value-loss targets R_t = A_t + V_t of `gae` (before whitening), [B, T], 0 off the mask."""
    _check(rewards, group_index, response_mask)
    _need_values(values, response_mask, "gae")
    _, ret = gae_advantages_and_returns(last_token_rewards(rewards, response_mask), values, response_mask, cfg.gamma, cfg.lam)
    return ret


@register_advantage("ppo_critic_free")
def ppo_critic_free(rewards, group_index, response_mask, cfg, values=None):
    """Critic-free PPO as in AReaL's boba recipe (Fu et al. 2025): GAE with V = 0, so
    A_t = (gamma * lam)^k * r where k is the number of response tokens after t (gamma = lam = 1 in
    AReaL: every token gets the sequence reward), then whitened over the whole batch's tokens
    (AReaL's adv_norm with group_adv_norm=false) if cfg.adv_whiten. Groups are ignored."""
    _check(rewards, group_index, response_mask)
    zeros = torch.zeros(response_mask.shape, dtype=rewards.dtype, device=rewards.device)
    adv, _ = gae_advantages_and_returns(last_token_rewards(rewards, response_mask), zeros, response_mask, cfg.gamma, cfg.lam)
    return masked_whiten(adv, response_mask) if cfg.adv_whiten else adv
