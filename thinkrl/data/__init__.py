"""Data: loading datasets (files, local HF datasets) or a task's generator; chat encoding."""
from __future__ import annotations

import functools
import random

from thinkrl.types import Sample


def load_task_data(cfg, task) -> tuple[list[Sample], list[Sample]]:
    """(train, eval) samples per the config: files with a field mapping, or the task's generator."""
    d = cfg.data
    if d.train_path:
        from thinkrl.data.datasets import load_splits

        train, ev = load_splits(d, task, cfg.run.seed)
        return train, ev[: d.num_eval]
    if not task.can_generate:
        raise ValueError(f"task {task.name!r} has no generator: set data.train_path")
    train = task.generate(d.num_train, seed=cfg.run.seed * 1000 + 1)
    ev = task.generate(d.num_eval, seed=cfg.run.seed * 1000 + 2)
    held = {str(s.prompt) for s in ev}
    train = [s for s in train if str(s.prompt) not in held]  # the held-out set is really held out
    return train, ev


def batch_for_step(samples: list[Sample], step: int, batch_size: int, seed: int, shuffle: bool = True) -> list[Sample]:
    """The prompts of RL step `step`: a deterministic function of (seed, step), so resume is exact."""
    n = len(samples)
    if n == 0:
        raise ValueError("no training samples")
    out = []
    for j in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(j, n)
        out.append(samples[_epoch_order(n, seed, epoch, shuffle)[pos]])
    return out


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> tuple[int, ...]:
    order = list(range(n))
    if shuffle:
        random.Random(f"{seed}-{epoch}").shuffle(order)
    return tuple(order)
