"""Reward shaping on plain lists / tensors of sequence rewards.

Order the controller applies (each step optional, driven by AlgoConfig):
  1. `apply_length_shaping`: cosine length reward (replaces the raw reward) and/or DAPO overlong penalty;
  2. `shape_rewards`: (r - reward_bias) * reward_scale;
  3. `thinkrl.algo.kl.kl_in_reward` when algo.kl_in_reward;
and `truncation_mask` drops truncated responses from the loss when algo.mask_truncated.
Group statistics (`thinkrl.algo.filters`) use the raw rewards, before any of this.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


def _t(x, dtype=torch.float32) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=dtype)


def shape_rewards(rewards, cfg) -> torch.Tensor:
    """r' = (r - cfg.reward_bias) * cfg.reward_scale. AReaL's +-5 on 0/1 rewards: bias 0.5, scale 10."""
    r = _t(rewards)
    return (r - cfg.reward_bias) * cfg.reward_scale


def _buffer_tokens(buffer: float, max_len: int) -> float:
    return buffer * max_len if 0 < buffer < 1 else float(buffer)


def overlong_penalty(lengths, max_len: int, buffer: float, factor: float = 1.0) -> torch.Tensor:
    """DAPO soft overlong punishment (Yu et al. 2025), with B the buffer (tokens if >= 1, else a
    fraction of max_len):

        0                                  if L <= max_len - B
        (max_len - B - L) / B * factor     if max_len - B < L <= max_len   (linear, 0 -> -factor)
        -factor                            if L > max_len
    """
    L = _t(lengths, torch.float64)
    b = _buffer_tokens(buffer, max_len)
    if not 0 < b <= max_len:
        raise ValueError(f"overlong buffer must be in (0, max_len={max_len}] tokens, got {b:g}")
    start = max_len - b
    pen = torch.clamp((start - L) / b, min=-1.0, max=0.0) * factor
    return pen.to(torch.float32)


def cosine_length_reward(
    lengths, correct, max_len: int, truncated=None,
    r_correct: Sequence[float] = (2.0, 1.0), r_wrong: Sequence[float] = (-10.0, 0.0),
    r_exceed: float = -10.0, correct_max: float | None = None,
) -> torch.Tensor:
    """Cosine length-scaled reward of "Demystifying Long Chain-of-Thought Reasoning in LLMs" (Yeo et al. 2025):

        cos(L; r0, rT) = rT + (r0 - rT) * (1 + cos(pi * L / max_len)) / 2      (r0 at L = 0, rT at max_len)
        R = cos(L; *r_correct) if correct, cos(L; *r_wrong) if wrong, r_exceed if truncated.

    Short correct answers earn more and short wrong answers are punished more (so the model keeps
    thinking when it is wrong). `correct_max` caps correct rewards, clipping the bonus for short
    correct answers (Light-R1, Wen et al. 2025); correct_max = r_correct[1] removes it entirely.
    `truncated` (bool per response) marks exceeding responses; if None, L >= max_len does.
    """
    L = _t(lengths, torch.float64).clamp(min=0)
    ok = _t(correct, torch.bool).bool().to(L.device)
    frac = (L / max_len).clamp(max=1.0)
    wave = (1 + torch.cos(math.pi * frac)) / 2

    def cos(r0: float, rT: float) -> torch.Tensor:
        return rT + (r0 - rT) * wave

    good = cos(*r_correct)
    if correct_max is not None:
        good = good.clamp(max=correct_max)
    R = torch.where(ok, good, cos(*r_wrong))
    exceed = (L >= max_len) if truncated is None else _t(truncated, torch.bool).bool().to(L.device)
    return torch.where(exceed, torch.full_like(R, r_exceed), R).to(torch.float32)


def truncation_mask(finish: Sequence[str]) -> torch.Tensor:
    """[B] float: 0 for responses cut by the length limit (finish == "length"), 1 otherwise.
    Multiply into the response mask to drop them from the loss (DAPO's overlong filtering)."""
    return torch.tensor([0.0 if f == "length" else 1.0 for f in finish])


def apply_length_shaping(rewards, lengths, max_len: int, cfg, finish: Sequence[str] | None = None) -> torch.Tensor:
    """Apply the length terms the config asks for to raw rewards:
    cosine reward if cfg.length_reward == "cosine" (correct = raw reward >= cfg.correct_threshold,
    exceed = finish == "length" when `finish` is given), then + overlong_penalty if cfg.overlong_buffer > 0."""
    r = _t(rewards).to(torch.float32)
    if cfg.length_reward == "cosine":
        truncated = None if finish is None else [f == "length" for f in finish]
        r = cosine_length_reward(_t(lengths).to(r.device), r >= cfg.correct_threshold, max_len, truncated,
                                 cfg.cosine_correct, cfg.cosine_wrong, cfg.cosine_exceed, cfg.cosine_correct_max)
    elif cfg.length_reward != "none":
        raise ValueError(f"algo.length_reward: unknown value {cfg.length_reward!r}; valid: cosine, none")
    if cfg.overlong_buffer > 0:
        r = r + overlong_penalty(_t(lengths).to(r.device), max_len, cfg.overlong_buffer, cfg.overlong_penalty_factor)
    return r
