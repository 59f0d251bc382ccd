"""Trajectories -> Batch: the reward pipeline and the advantage estimator, in one place.

Order: group metrics on raw rewards -> length shaping -> (r - bias) * scale -> advantage estimator
-> on-policy distillation's per-token term (algo.distill_teacher) -> masks (uniform groups, truncated responses)
applied to the loss mask.
"""
from __future__ import annotations

import dataclasses

import torch

from thinkrl.algo.advantages import gae_returns
from thinkrl.algo.distill import distill_advantages, distill_metrics
from thinkrl.algo.filters import group_metrics, uniform_groups
from thinkrl.algo.kl import kl_in_reward
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


def make_batch(trajs: list[Trajectory], acfg, max_new_tokens: int, values=None, ref_logprobs=None,
               teacher_logprobs=None) -> Batch:
    """Shape rewards, compute per-token advantages, and return the Batch (with rollout metrics).

    `values`: per trajectory, V of the state before each token (`Critic.values`), for `gae`.
    `teacher_logprobs`: per trajectory, the teacher's log-prob of each token, for on-policy distillation
    (algo.distill_teacher; thinkrl.algo.distill)."""
    if not trajs:
        raise ValueError("make_batch: no trajectories")
    gidx = group_indices(trajs)
    raw = torch.tensor([t.reward for t in trajs], dtype=torch.float32)
    metrics = rollout_metrics(trajs, acfg.correct_threshold)
    r = shaped_rewards(trajs, acfg, max_new_tokens)
    mask = response_mask(trajs)
    if acfg.kl_coef > 0 and acfg.kl_in_reward:  # KL to the reference folded into the sequence reward
        if ref_logprobs is None:
            raise ValueError("algo.kl_in_reward with algo.kl_coef > 0 needs reference log-probs")
        behav = pad_values([t.logprobs for t in trajs], trajs)
        ref = pad_values(ref_logprobs, trajs)
        r = kl_in_reward(r, behav, ref, mask, acfg.kl_coef, acfg.kl_estimator)
        metrics["kl/reward_penalty_mean"] = float((shaped_rewards(trajs, acfg, max_new_tokens) - r).mean())
    adv = get_advantage(acfg.advantage)(r, gidx, mask, acfg, *([] if values is None else [pad_values(values, trajs)]))
    if acfg.distill_teacher:  # the teacher's per-token reverse KL, mixed with the verifier's advantage
        if teacher_logprobs is None:
            raise ValueError("algo.distill_teacher is set: make_batch needs the teacher's log-probs")
        behav, teacher = pad_values([t.logprobs for t in trajs], trajs), pad_values(teacher_logprobs, trajs)
        adv = distill_advantages(adv, behav, teacher, mask, acfg.distill_coef, acfg.distill_verifier_coef,
                                 acfg.distill_estimator)
        metrics.update(distill_metrics(behav, teacher, mask))
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


def shaped_rewards(trajs: list[Trajectory], acfg, max_new_tokens: int) -> torch.Tensor:
    """[B] sequence rewards the estimator sees: length shaping, then (r - bias) * scale."""
    raw = torch.tensor([t.reward for t in trajs], dtype=torch.float32)
    lengths = [t.num_response_tokens for t in trajs]
    r = apply_length_shaping(raw, lengths, max_new_tokens, acfg, [t.finish for t in trajs])
    return shape_rewards(r, acfg)


def response_mask(trajs: list[Trajectory]) -> torch.Tensor:
    """[B, T] float: each trajectory's loss mask, right-padded with 0."""
    mask = torch.zeros(len(trajs), max(len(t.tokens) for t in trajs))
    for i, t in enumerate(trajs):
        mask[i, : len(t.tokens)] = torch.tensor(t.loss_mask, dtype=torch.float32)
    return mask


def pad_values(values, trajs: list[Trajectory]) -> torch.Tensor:
    """Per-trajectory values (lists or 1-D tensors, one per token) -> [B, T] float32, right-padded with 0."""
    if len(values) != len(trajs):
        raise ValueError(f"values: {len(values)} entries for {len(trajs)} trajectories")
    out = torch.zeros(len(trajs), max(len(t.tokens) for t in trajs))
    for i, (v, t) in enumerate(zip(values, trajs)):
        v = torch.as_tensor(v, dtype=torch.float32).detach().cpu()
        if v.shape != (len(t.tokens),):
            raise ValueError(f"values[{i}]: expected one value per token ({len(t.tokens)}), got shape {tuple(v.shape)}")
        out[i, : len(t.tokens)] = v
    return out


def gae_targets(trajs: list[Trajectory], acfg, max_new_tokens: int, values) -> list[list[float]]:
    """The critic's targets: `gae_returns` on the rewards make_batch shapes, per trajectory (0 off the mask)."""
    mask = response_mask(trajs)
    ret = gae_returns(shaped_rewards(trajs, acfg, max_new_tokens), group_indices(trajs), mask, acfg, pad_values(values, trajs))
    return [ret[i, : len(t.tokens)].tolist() for i, t in enumerate(trajs)]
