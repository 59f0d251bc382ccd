"""Where the rollout engine runs, and how weights reach it (rollout.placement, rollout.weight_sync).

- `inline`: the engine built for the run (thinkrl.system.setup.make_inference_engine), in this process.
- `process`: an embedded engine in a process of its own (thinkrl.rollout.process.ProcessEngine): on one
  machine the trainer and the engine then run at the same time on separate cores, each with its own GIL.
- `auto`: `process` for the embedded engine when η > 0 (generation overlaps training), else `inline`.
The Ray backend (thinkrl.system.ray_) is a third placement of the same parts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch


def resolved_placement(cfg) -> str:
    r = cfg.rollout
    if r.placement != "auto":
        return r.placement
    return "process" if r.engine == "embedded" and r.max_staleness > 0 else "inline"


@dataclass
class Placed:
    engine: object  # the engine the rollouts use
    sync: object  # its weight transport (thinkrl.rollout.weights)
    owned: bool  # built here: the run closes it
    process: bool = False  # an engine process: the trainer's threads leave it its cores

    def close(self) -> None:
        self.sync.close()
        if self.owned:
            self.engine.close()


def place_rollouts(cfg, engine, model, tokenizer, version: int) -> Placed:
    """The rollout engine for cfg: `engine` itself (inline) or an engine process started from `model`."""
    from thinkrl.rollout.weights import WeightSync, make_weight_sync

    r = cfg.rollout
    if resolved_placement(cfg) == "inline":
        owned = cfg.run.deterministic  # evaluation must not share the rollouts' engine: it would change its batches
        if owned:
            import copy

            from thinkrl.system.setup import make_inference_engine

            engine = make_inference_engine(cfg, copy.deepcopy(model), tokenizer, version=version)
        return Placed(engine, make_weight_sync(r.weight_sync, [engine], r.weights_dir or None), owned)
    from thinkrl.rollout.process import ProcessEngine

    eng = ProcessEngine.from_config(cfg, model, tokenizer, version)
    return Placed(eng, WeightSync([eng]), True, process=True)


def threads_for_trainer(cfg, engine_process: bool) -> int | None:
    """With an engine process on the CPU the cores are split: the trainer gets run.threads, or the cores the
    engine's rollout.engine_threads leave (None: leave torch's setting)."""
    if not engine_process:
        return None
    return cfg.run.threads or max(1, (os.cpu_count() or 2) - cfg.rollout.engine_threads)


def with_threads(n: int | None, fn: Callable[[], int]) -> int:
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)
