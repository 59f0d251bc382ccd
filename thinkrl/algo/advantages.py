"""Advantage estimators.

Signature of every estimator:

    fn(rewards: Tensor[B], group_index: Tensor[B] (long), response_mask: Tensor[B, T] (float),
       cfg: AlgoConfig, values: Tensor[B, T] | None = None) -> Tensor[B, T]

`rewards` are sequence rewards (already scaled/biased), `group_index` says which prompt each
response belongs to (the n answers of a prompt share an index), `response_mask` is 1 on the
model's tokens. The result is a per-token advantage, 0 where the mask is 0.
"""
from __future__ import annotations

import torch

from thinkrl.algo.registry import register_advantage


def group_stats(rewards: torch.Tensor, group_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample group mean, group (unbiased) std and group size."""
    num_groups = int(group_index.max().item()) + 1 if group_index.numel() else 0
    r = rewards.to(torch.float64)
    count = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group_index, torch.ones_like(r))
    total = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group_index, r)
    mean = total / count
    sq = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group_index, (r - mean[group_index]) ** 2)
    std = torch.sqrt(sq / (count - 1).clamp(min=1))
    return mean[group_index].to(rewards.dtype), std[group_index].to(rewards.dtype), count[group_index].to(rewards.dtype)


@register_advantage("grpo")
def grpo(rewards, group_index, response_mask, cfg, values=None, eps: float = 1e-6):
    """GRPO: (r - mean_group) / (std_group + eps), broadcast to every response token."""
    mean, std, _ = group_stats(rewards, group_index)
    adv = rewards - mean
    if getattr(cfg, "norm_std", True):
        adv = adv / (std + eps)
    return adv[:, None] * response_mask
