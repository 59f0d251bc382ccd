"""Trajectories -> Batch: the reward pipeline and the advantage estimator, in one place.

Order: group metrics on raw rewards -> length shaping -> (r - bias) * scale -> advantage estimator
-> masks (uniform groups, truncated responses) applied to the loss mask.
"""
from __future__ import annotations

import dataclasses

import torch

from thinkrl.algo.filters import group_metrics, uniform_groups
from thinkrl.algo.registry import get_advantage
from thinkrl.algo.shaping import apply_length_shaping, shape_rewards
from thinkrl.types import Batch, Trajectory


def group_indices(trajs: list[Trajectory]) -> torch.Tensor:
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(t.group_id, len(ids)) for t in trajs], dtype=torch.long)


def rollout_metrics(trajs: list[Trajectory], correct_threshold: float = 1.0) -> dict[str, float]:
    raw = torch.tensor([t.reward for t in trajs], dtype=torch.float32)
    lens = [t.num_response_tokens for t in trajs]
    m = {
        "reward/mean": float(raw.mean()),
        "acc/mean": float((raw >= correct_threshold).float().mean()),
        "len/response_mean": sum(lens) / max(len(lens), 1),
        "len/response_max": float(max(lens, default=0)),
        "len/truncated_frac": sum(t.finish == "length" for t in trajs) / max(len(trajs), 1),
    }
    m.update(group_metrics(raw, group_indices(trajs), correct_threshold))
    return m


def make_batch(trajs: list[Trajectory], acfg, max_new_tokens: int) -> Batch:
    """Shape rewards, compute per-token advantages, and return the Batch (with rollout metrics)."""
    if not trajs:
        raise ValueError("make_batch: no trajectories")
    gidx = group_indices(trajs)
    raw = torch.tensor([t.reward for t in trajs], dtype=torch.float32)
    metrics = rollout_metrics(trajs, acfg.correct_threshold)
    lengths = [t.num_response_tokens for t in trajs]
    r = apply_length_shaping(raw, lengths, max_new_tokens, acfg, [t.finish for t in trajs])
    r = shape_rewards(r, acfg)
    T = max(len(t.tokens) for t in trajs)
    mask = torch.zeros(len(trajs), T)
    for i, t in enumerate(trajs):
        mask[i, : len(t.tokens)] = torch.tensor(t.loss_mask, dtype=torch.float32)
    adv = get_advantage(acfg.advantage)(r, gidx, mask, acfg)
    keep = torch.ones(len(trajs), dtype=torch.bool)
    if acfg.mask_uniform_groups:
        keep &= ~uniform_groups(raw, gidx)
    if acfg.mask_truncated:
        keep &= torch.tensor([t.finish != "length" for t in trajs])
    out_trajs = []
    for i, t in enumerate(trajs):
        if not keep[i]:  # no loss on this response; keep it for metrics and token counts
            t = dataclasses.replace(t, loss_mask=[False] * len(t.tokens))
        out_trajs.append(t)
    metrics["adv/abs_mean"] = float((adv.abs() * mask).sum() / mask.sum().clamp(min=1))
    metrics["batch/kept_frac"] = float(keep.float().mean())
    advantages = [adv[i, : len(t.tokens)].tolist() for i, t in enumerate(trajs)]
    return Batch(trajectories=out_trajs, advantages=advantages, metrics=metrics)
