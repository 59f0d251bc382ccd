"""`thinkrl train` for any train.world_size: one process runs the RL loop (thinkrl.system.train.train_rl);
more start data-parallel ranks (thinkrl.train.distributed.launch), or run as one rank under torchrun.

Rank 0 runs train_rl unchanged (engine, generation, evaluation, logging, checkpoints); ranks > 0 serve the
trainer's collective calls (thinkrl.train.distributed.serve). Config validation refuses what this does not run
(rollout.max_staleness > 0 or the Ray backend with several ranks).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from thinkrl.train.distributed import init_distributed, launch, lead, serve, shutdown, under_torchrun


def _rl_rank(rank: int, world_size: int, cfg, resume: bool) -> dict | None:
    from thinkrl.device import resolve_device
    from thinkrl.system.setup import build_run
    from thinkrl.system.train import train_rl

    ctx = init_distributed(world_size, rank, mode=cfg.train.parallel, device=resolve_device(cfg.run.device))
    try:
        if rank == 0:
            with lead(ctx):
                return train_rl(cfg, resume=resume)
        run = build_run(cfg)  # the same model (DDP / FSDP2 broadcast rank 0's weights anyway)
        serve(run.model, ctx)
        return None
    finally:
        shutdown()


def run_train(cfg, resume: bool = False, start_method: str = "spawn") -> dict | None:
    """Returns the final eval metrics (None on ranks > 0 under torchrun)."""
    world_size = int(os.environ["WORLD_SIZE"]) if under_torchrun() and cfg.train.world_size == 1 else cfg.train.world_size
    if world_size == 1:
        from thinkrl.system.train import train_rl

        return train_rl(cfg, resume=resume)
    if not cfg.train.packing:
        raise ValueError("train.packing=false: train.world_size > 1 needs packed micro-batches (train.packing=true)")
    if resume:
        from thinkrl.system.rundir import RunDir

        RunDir(cfg.run.output_dir).resume_checkpoint()  # no good checkpoint: the one-line error before ranks start
    if under_torchrun():
        if int(os.environ["WORLD_SIZE"]) != world_size:
            raise ValueError(f"train.world_size={world_size} but torchrun started WORLD_SIZE={os.environ['WORLD_SIZE']} processes")
        return _rl_rank(int(os.environ["RANK"]), world_size, cfg, resume)
    cpu = "cuda" not in str(cfg.run.device) and not (cfg.run.device == "auto" and torch.cuda.is_available())
    threads = cfg.run.threads or (max(1, (os.cpu_count() or 1) // world_size) if cpu else 0)
    launch(_rl_rank, world_size, cfg, resume, threads=threads, start_method=start_method)
    return json.loads((Path(cfg.run.output_dir) / "eval.json").read_text())
