"""Group statistics, uniform-group mask and the dynamic sampler."""
from __future__ import annotations

import pytest
import torch

from thinkrl.algo.filters import DynamicSampler, group_metrics, uniform_groups

# groups: 10 all correct, 11 all wrong, 12 mixed, 13 uniform partial credit (0.5, 0.5)
REWARDS = [1, 1, 0, 0, 1, 0, 0.5, 0.5]
GROUPS = [10, 10, 11, 11, 12, 12, 13, 13]


def test_group_metrics_hand_values():
    m = group_metrics(REWARDS, GROUPS)
    assert m == {"group/all_correct_frac": 0.25, "group/all_wrong_frac": 0.5,
                 "group/uniform_frac": 0.75, "group/num": 4.0}
    m = group_metrics(REWARDS, GROUPS, correct_threshold=0.5)
    assert m["group/all_correct_frac"] == 0.5 and m["group/all_wrong_frac"] == 0.25


def test_uniform_groups():
    assert uniform_groups(REWARDS, GROUPS).tolist() == [True, True, True, True, False, False, True, True]
    with pytest.raises(ValueError, match="length"):
        uniform_groups([1.0, 0.0], [0])


def test_dynamic_sampler():
    s = DynamicSampler(target_groups=2, max_rounds=3)
    keep = s.add(REWARDS, GROUPS)  # one informative group
    assert keep.tolist() == [False, False, False, False, True, True, False, False]
    assert not s.done and s.rounds == 1
    s.add(torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([20, 20, 21, 21]))
    assert s.done and s.enough and not s.short
    assert s.metrics() == {"dynamic/rounds": 2.0, "dynamic/informative_groups": 2.0, "dynamic/informative_frac": 2 / 6}
    s.reset()
    for _ in range(3):
        assert not s.done
        s.add([1.0, 1.0], [0, 0])
    assert s.done and s.short
    with pytest.raises(ValueError, match="max_rounds"):
        DynamicSampler(target_groups=1, max_rounds=0)
