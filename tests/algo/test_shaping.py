"""Reward shaping: scale/bias, DAPO overlong penalty, cosine length reward, truncation mask."""
from __future__ import annotations

import math

import pytest
import torch

from thinkrl.algo.config import AlgoConfig
from thinkrl.algo.shaping import (apply_length_shaping, cosine_length_reward, overlong_penalty, shape_rewards,
                                  truncation_mask)


def test_shape_rewards_areal_plus_minus_five():
    cfg = AlgoConfig(reward_bias=0.5, reward_scale=10.0)
    assert shape_rewards([0.0, 1.0], cfg).tolist() == [-5.0, 5.0]
    assert shape_rewards(torch.tensor([0.3]), AlgoConfig()).tolist() == pytest.approx([0.3])


def test_overlong_penalty_hand_values():
    # max 20, buffer 4: free up to 16, linear to -factor at 20, -factor beyond
    pen = overlong_penalty([10, 16, 18, 20, 25], max_len=20, buffer=4, factor=2.0)
    assert pen.tolist() == pytest.approx([0.0, 0.0, -1.0, -2.0, -2.0])
    assert overlong_penalty([10, 16, 18, 20, 25], 20, 0.2, 2.0).tolist() == pen.tolist()  # fraction of max_len
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty([1], max_len=20, buffer=30)


def test_cosine_length_reward_hand_values():
    r = cosine_length_reward([0, 50, 100, 50, 0, 100], [True, True, True, False, False, False], max_len=100,
                             truncated=[False, False, False, False, False, True])
    # correct: 2 at L=0, 1.5 at half, 1 at max; wrong: -10 at L=0, -5 at half; truncated: -10
    assert r.tolist() == pytest.approx([2.0, 1.5, 1.0, -5.0, -10.0, -10.0])
    q = cosine_length_reward([25], [True], max_len=100)
    assert q.item() == pytest.approx(1.0 + (1 + math.cos(math.pi / 4)) / 2)
    # Light-R1: the bonus of short correct answers clipped
    c = cosine_length_reward([0, 50, 100], [True] * 3, max_len=100, truncated=[False] * 3, correct_max=1.2)
    assert c.tolist() == pytest.approx([1.2, 1.2, 1.0])
    # without `truncated`, L >= max_len counts as exceeding
    assert cosine_length_reward([100], [True], 100).item() == -10.0


def test_truncation_mask():
    assert truncation_mask(["stop", "length", "abort"]).tolist() == [1.0, 0.0, 1.0]


def test_apply_length_shaping():
    assert torch.equal(apply_length_shaping([1.0, 0.0], [5, 5], 10, AlgoConfig()), torch.tensor([1.0, 0.0]))
    cfg = AlgoConfig(overlong_buffer=4)
    assert apply_length_shaping([1.0, 1.0], [5, 8], 10, cfg).tolist() == pytest.approx([1.0, 0.5])
    cfg = AlgoConfig(length_reward="cosine", correct_threshold=0.9)
    out = apply_length_shaping([1.0, 0.5, 1.0], [5, 5, 10], 10, cfg, finish=["stop", "stop", "length"])
    assert out.tolist() == pytest.approx([1.5, -5.0, -10.0])
    with pytest.raises(ValueError, match="length_reward"):
        apply_length_shaping([1.0], [1], 10, AlgoConfig(length_reward="linear"))
