"""Group statistics and dynamic sampling (DAPO, Yu et al. 2025).

Definitions (on raw verifier rewards, before shaping):
- a response is *correct* when its reward >= `correct_threshold` (default 1.0, the verifier's max);
- a group is *all correct* when every response is correct, *all wrong* when none is;
- a group is *uniform* when all its rewards are equal (max - min <= atol): every group-baseline
  advantage (grpo, dr_grpo, rloo) is then 0, so the group only dilutes the loss.
With 0/1 rewards, uniform == all correct or all wrong; with partial credit they differ.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


def _groups(rewards, group_index) -> tuple[torch.Tensor, torch.Tensor, int]:
    r = torch.as_tensor(rewards).detach().cpu().to(torch.float64).flatten()  # statistics live on the CPU
    g = torch.as_tensor(group_index).detach().cpu().long().flatten()
    if r.shape != g.shape:
        raise ValueError(f"rewards and group_index differ in length ({r.numel()} vs {g.numel()})")
    _, g = torch.unique(g, return_inverse=True)  # dense 0..G-1
    return r, g, int(g.max()) + 1 if g.numel() else 0


def _group_min_max(r: torch.Tensor, g: torch.Tensor, G: int) -> tuple[torch.Tensor, torch.Tensor]:
    lo = torch.full((G,), float("inf"), dtype=r.dtype).scatter_reduce(0, g, r, "amin")
    hi = torch.full((G,), float("-inf"), dtype=r.dtype).scatter_reduce(0, g, r, "amax")
    return lo, hi


def group_metrics(rewards, group_index, correct_threshold: float = 1.0, atol: float = 1e-6) -> dict[str, float]:
    """group/all_correct_frac, group/all_wrong_frac, group/uniform_frac (fractions of groups) and
    group/num (number of groups). See the module docstring for the definitions."""
    r, g, G = _groups(rewards, group_index)
    if G == 0:
        return {"group/all_correct_frac": 0.0, "group/all_wrong_frac": 0.0, "group/uniform_frac": 0.0, "group/num": 0.0}
    lo, hi = _group_min_max(r, g, G)
    return {
        "group/all_correct_frac": float((lo >= correct_threshold).double().mean()),
        "group/all_wrong_frac": float((hi < correct_threshold).double().mean()),
        "group/uniform_frac": float(((hi - lo) <= atol).double().mean()),
        "group/num": float(G),
    }


def uniform_groups(rewards, group_index, atol: float = 1e-6) -> torch.Tensor:
    """[B] bool (CPU): True for responses whose group is uniform (all rewards equal). Drop them from the loss
    (algo.mask_uniform_groups) by zeroing their response mask *before* counting num_tokens / num_seqs."""
    r, g, G = _groups(rewards, group_index)
    if G == 0:
        return torch.zeros(0, dtype=torch.bool)
    lo, hi = _group_min_max(r, g, G)
    return ((hi - lo) <= atol)[g]


@dataclass
class DynamicSampler:
    """Decides when a step has enough informative (non-uniform) groups, DAPO-style.

        sampler = DynamicSampler(target_groups=cfg.rollout.batch_prompts, max_rounds=cfg.algo.dynamic_max_rounds)
        while not sampler.done:
            rewards, group_index = generate_one_round()
            keep = sampler.add(rewards, group_index)   # [B] bool: responses of informative groups
            ...keep those; the controller trims the kept groups to target_groups...
        sampler.metrics(); sampler.reset()

    `done` once target_groups informative groups were seen, or after max_rounds rounds (the step then
    trains on what it has: `short` is True). Group ids must be unique across rounds.
    """

    target_groups: int
    max_rounds: int = 3
    atol: float = 1e-6
    rounds: int = field(default=0, init=False)
    informative: int = field(default=0, init=False)
    seen: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.target_groups < 1:
            raise ValueError(f"DynamicSampler.target_groups must be >= 1, got {self.target_groups}")
        if self.max_rounds < 1:
            raise ValueError(f"DynamicSampler.max_rounds must be >= 1, got {self.max_rounds}")

    def add(self, rewards, group_index) -> torch.Tensor:
        """Record one generation round; returns the keep mask of its responses (non-uniform groups)."""
        uni = uniform_groups(rewards, group_index, self.atol)
        g = torch.as_tensor(group_index).detach().cpu().long().flatten()
        num = int(torch.unique(g).numel())
        self.rounds += 1
        self.seen += num
        self.informative += num - int(torch.unique(g[uni]).numel())
        return ~uni

    @property
    def enough(self) -> bool:
        return self.informative >= self.target_groups

    @property
    def done(self) -> bool:
        return self.enough or self.rounds >= self.max_rounds

    @property
    def short(self) -> bool:
        """Rounds exhausted without enough informative groups."""
        return self.rounds >= self.max_rounds and not self.enough

    def metrics(self) -> dict[str, float]:
        return {"dynamic/rounds": float(self.rounds), "dynamic/informative_groups": float(self.informative),
                "dynamic/informative_frac": self.informative / max(self.seen, 1)}

    def reset(self) -> None:
        self.rounds = self.informative = self.seen = 0
