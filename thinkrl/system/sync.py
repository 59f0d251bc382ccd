"""The synchronous RL controller: generate a batch, reward, advantages, train, update weights, repeat.

This is the baseline (and η = 0 of the async controller). One step:

    samples  = batch_for_step(...)                       # deterministic in (seed, step): exact resume
    trajs    = collect(engine, workflow, samples)        # n answers per prompt, rewarded
    batch    = make_batch(trajs, cfg.algo, ...)          # reward shaping + advantages
    metrics  = trainer.step(batch)                       # PPO-family loss, one optimizer step
    engine.load_weights(trainer.export_weights(), trainer.version)
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from thinkrl.algo.batch import gae_targets, make_batch
from thinkrl.data import batch_for_step
from thinkrl.rollout.workflow import collect


def generate_step(step: int, cfg, engine, workflow, train_samples) -> tuple[list, dict]:
    """The step's trajectories. With algo.dynamic_sampling (DAPO), groups whose rewards are all equal carry no
    GRPO signal: more prompts are sampled (up to algo.dynamic_max_rounds rounds) until batch_prompts
    informative groups are found; the batch keeps those (if rounds run out, it tops up with uniform ones)."""
    B = cfg.rollout.batch_prompts
    samples = batch_for_step(train_samples, step, B, cfg.run.seed, cfg.data.shuffle)
    trajs = collect(engine, workflow, samples, group_prefix=f"{step}:")
    if not cfg.algo.dynamic_sampling:
        return trajs, {}
    from thinkrl.algo.batch import group_indices
    from thinkrl.algo.filters import DynamicSampler

    sampler = DynamicSampler(target_groups=B, max_rounds=cfg.algo.dynamic_max_rounds)
    informative, uniform = [], []
    for rnd in range(cfg.algo.dynamic_max_rounds):
        if rnd:  # further prompts: another deterministic draw for this step
            samples = batch_for_step(train_samples, step, B, cfg.run.seed + 7919 * rnd, cfg.data.shuffle)
            trajs = collect(engine, workflow, samples, group_prefix=f"{step}.{rnd}:")
        gidx = group_indices(trajs)
        keep = sampler.add(torch.tensor([t.reward for t in trajs]), gidx)
        groups: dict[int, list[int]] = {}
        for i, g in enumerate(gidx.tolist()):
            groups.setdefault(g, []).append(i)
        for idx in groups.values():  # a group is informative when its rewards are not all equal
            (informative if bool(keep[idx[0]]) else uniform).append([trajs[i] for i in idx])
        if sampler.done:
            break
    chosen = (informative + uniform)[:B]
    return [t for grp in chosen for t in grp], sampler.metrics()


def rl_step(step: int, cfg, engine, workflow, trainer, train_samples, critic=None) -> dict:
    """One step; `critic` (thinkrl.train.critic.Critic) supplies the values for algo.advantage=gae."""
    t0 = time.perf_counter()
    trajs, dyn = generate_step(step, cfg, engine, workflow, train_samples)
    t_gen = time.perf_counter() - t0
    values = critic.values(trajs) if critic is not None else None
    ref = trainer.ref_logprobs(trajs) if cfg.algo.kl_coef > 0 else None
    batch = make_batch(trajs, cfg.algo, cfg.rollout.max_new_tokens, values=values, ref_logprobs=ref)
    old = trainer.logprobs(batch.trajectories) if (cfg.algo.ppo_epochs > 1 or cfg.algo.loss == "decoupled_ppo" or cfg.algo.tis_level != "none") else None
    m = dict(batch.metrics)
    if critic is None or not critic.warming_up:  # algo.critic_warmup_steps: train only the critic first
        m.update(trainer.step(batch, old_logprobs=old, ref_logprobs=None if cfg.algo.kl_in_reward else ref))
    m.update(dyn)
    if critic is not None:
        m.update(critic.step(trajs, gae_targets(trajs, cfg.algo, cfg.rollout.max_new_tokens, values), old_values=values))
    t1 = time.perf_counter()
    engine.load_weights(trainer.export_weights(), trainer.version)
    t_sync = time.perf_counter() - t1
    gen_tokens = sum(t.num_response_tokens for t in trajs)
    dt = time.perf_counter() - t0
    m.update({
        "perf/gen_seconds": t_gen,
        "perf/sync_seconds": t_sync,
        "perf/step_seconds": dt,
        "perf/gen_tokens_per_s": gen_tokens / max(t_gen, 1e-9),
        "perf/tokens_per_s": (m.get("perf/train_tokens", 0.0)) / max(dt, 1e-9),
        "staleness/mean": 0.0,
        "staleness/max": 0.0,
    })
    return m


def run_sync(cfg, engine, workflow, trainer, train_samples, start_step: int, end_step: int,
             on_step: Callable[[int, dict], None] | None = None, time_budget: float | None = None, critic=None) -> int:
    """Steps [start_step, end_step) (or until time_budget seconds). Returns the last finished step."""
    t0 = time.perf_counter()
    step = start_step
    while step < end_step:
        m = rl_step(step, cfg, engine, workflow, trainer, train_samples, critic=critic)
        step += 1
        if on_step:
            on_step(step, m)
        if time_budget is not None and time.perf_counter() - t0 >= time_budget:
            break
    return step
