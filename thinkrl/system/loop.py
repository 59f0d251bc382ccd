"""The RL loop: one controller for every mode. Sync is η = 0 of it, async is η > 0 (rollout.max_staleness), and
Ray or an engine process are placements of its parts (thinkrl.system.placement, thinkrl.system.ray_).

    last = run_loop(cfg, trainer, engine, sync, workflow, train_samples, start, end, on_step, checkpoint)

One step, written once (read `run_loop` top to bottom):

    groups  = buffer.take()                     # B finished prompt groups, none staler than η
    groups  = dynamic filter                    # algo.dynamic_sampling: more batches until B informative groups
    batch   = make_batch(trajs, algo)           # rewards -> shaping -> advantages
    metrics = trainer.step(batch)               # the loss the config names; nothing is swapped
    producer.publish(trainer, version)          # weights to the engine (now, or when the fixed schedule needs them)
    checkpoint(step, state, keep_all)           # every train.save_every steps and at the end

Rollouts run on the producer's thread (thinkrl.system.rollouts) while the trainer trains; with η = 0 the bound
lets a batch start only after the previous step's weights are loaded, which is the synchronous loop.
With run.deterministic the producer follows a fixed schedule (batch j from policy version max(0, j - η)) and a
checkpoint waits until the batches that need older weights than the checkpoint's are generated, then keeps
them: a resumed run continues as if it had never stopped.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import torch

from thinkrl.algo.batch import gae_targets, group_indices, make_batch
from thinkrl.algo.filters import DynamicSampler
from thinkrl.data import batch_for_step
from thinkrl.errors import RunFault
from thinkrl.rollout.multiturn import tool_metrics
from thinkrl.system.rollouts import Producer
from thinkrl.system.staleness import Group, StalenessBuffer, staleness_metrics
from thinkrl.tasks.isolation import reward_fault_metrics
from thinkrl.train.engine import NumericalFault, stop_on_bad_steps

log = logging.getLogger(__name__)


def engine_fault_of(e: BaseException) -> RunFault | None:
    """The RunFault of the rollout side (an engine process gone, every server down) behind `e`, else None; a
    trainer fault (NumericalFault) is not one."""
    fault = e if isinstance(e, RunFault) else e.__cause__ if isinstance(e.__cause__, RunFault) else None
    return None if isinstance(fault, NumericalFault) else fault


def needs_old_logprobs(acfg) -> bool:
    """A recompute pass for the old (proximal) policy's log-probs: several epochs, or a rollout correction against
    it. With one epoch decoupled PPO takes its proximal log-probs from the step's own forward (the weights before
    the step)."""
    return acfg.ppo_epochs > 1 or acfg.rollout_correction != "none"


def sample_lookup(cfg, train_samples) -> Callable[[int], object]:
    """Group j's prompt: stream position j of the training data (thinkrl.data.batch_for_step)."""
    B = cfg.rollout.batch_prompts
    cache: dict[int, list] = {}
    lock = threading.Lock()

    def sample_of(j: int):
        step = j // B
        with lock:
            if step not in cache:
                cache[step] = batch_for_step(train_samples, step, B, cfg.run.seed, cfg.data.shuffle)
                for old in [s for s in cache if s < step - 64]:
                    del cache[old]
            return cache[step][j % B]

    return sample_of


def take_batch(cfg, buffer: StalenessBuffer) -> tuple[list[Group], dict]:
    """The step's groups. With algo.dynamic_sampling (DAPO), uniform groups (all rewards equal) carry no signal:
    further batches are taken (up to algo.dynamic_max_rounds in all) until B informative groups are found; the
    batch keeps those, topped up with uniform ones if the rounds run out; the rest is discarded, and counted."""
    B = cfg.rollout.batch_prompts
    groups = buffer.take()
    if not cfg.algo.dynamic_sampling:
        return groups, {}
    sampler = DynamicSampler(target_groups=B, max_rounds=cfg.algo.dynamic_max_rounds)
    informative, uniform = [], []
    while True:
        trajs = [t for g in groups for t in g.trajs]
        keep = sampler.add(torch.tensor([t.reward for t in trajs]), group_indices(trajs))
        at = 0
        for g in groups:  # a group that returned no trajectories counts as uniform
            (informative if g.trajs and bool(keep[at]) else uniform).append(g)
            at += len(g.trajs)
        if sampler.done:
            break
        buffer.request_more()
        groups = buffer.take()
    chosen = (informative + uniform)[:B]
    m = sampler.metrics()
    m["dynamic/discarded_groups"] = float(len(informative) + len(uniform) - len(chosen))
    return sorted(chosen, key=lambda g: g.index), m


def train_on(cfg, trainer, critic, trajs, teacher=None) -> dict:
    """Advantages, the policy step (and the critic's): the metrics. `teacher` (algo.distill_teacher,
    thinkrl.train.teacher) scores the sampled tokens for on-policy distillation."""
    acfg = cfg.algo
    values = critic.values(trajs) if critic is not None else None
    ref = trainer.ref_logprobs(trajs) if acfg.kl_coef > 0 else None
    teacher_lp = teacher.logprobs(trajs) if teacher is not None else None
    batch = make_batch(trajs, acfg, cfg.rollout.max_new_tokens, values=values, ref_logprobs=ref,
                       teacher_logprobs=teacher_lp)
    old = trainer.logprobs(batch.trajectories) if needs_old_logprobs(acfg) else None
    m = dict(batch.metrics)
    if critic is None or not critic.warming_up:  # algo.critic_warmup_steps: train only the critic first
        m.update(trainer.step(batch, old_logprobs=old, ref_logprobs=None if acfg.kl_in_reward else ref))
    if critic is not None:
        m.update(critic.step(trajs, gae_targets(trajs, acfg, cfg.rollout.max_new_tokens, values), old_values=values))
    return m


def run_loop(cfg, trainer, engine, sync, workflow, train_samples, start_step: int, end_step: int,
             on_step: Callable[[int, dict], None] | None = None,
             checkpoint: Callable[[int, dict, bool], None] | None = None, time_budget: float | None = None,
             critic=None, restore: dict | None = None, teacher=None) -> int:
    """Steps [start_step, end_step) (or until time_budget seconds). Returns the last finished step.
    `engine` generates the rollouts and `sync` loads weights into it (thinkrl.rollout.weights). `checkpoint(step,
    state, keep_all)` is called every train.save_every steps and at the end with what the rollouts need to continue
    (`restore` on resume), and after an engine fault with keep_all=True (no earlier checkpoint is rotated out). `teacher`: the distillation teacher (algo.distill_teacher), or None."""
    B, eta, fixed = cfg.rollout.batch_prompts, cfg.rollout.max_staleness, cfg.run.deterministic
    buffer = StalenessBuffer(B, eta, start_step, trainer.version,
                             adaptive=cfg.rollout.admission == "adaptive" and not fixed)
    if restore is not None:
        buffer.load_state_dict(restore)
    producer = Producer(buffer, engine, sync, workflow, sample_lookup(cfg, train_samples), cfg.run.seed, fixed)
    producer.start()

    saved = [start_step]  # the step of the newest checkpoint (or the start)

    def save(step: int, keep_all: bool = False) -> None:
        if checkpoint is None:
            return
        if fixed:  # the batches that need weights older than these: generated now, kept in the checkpoint
            producer.caught_up(step + eta)
        checkpoint(step, {"rollouts": buffer.state_dict()}, keep_all)
        saved[0] = step

    t_start = time.perf_counter()
    step = start_step
    try:
        while step < end_step:
            t0 = time.perf_counter()
            groups, m = take_batch(cfg, buffer)
            t1, c1 = time.perf_counter(), time.thread_time()
            trajs = [t for g in groups for t in g.trajs]
            stale = staleness_metrics(trajs, trainer.version, eta)
            if stale["staleness/max"] > eta:  # the buffer guarantees this; never train on it if it breaks
                raise RuntimeError(f"staleness {stale['staleness/max']} > rollout.max_staleness={eta}")
            m.update(reward_fault_metrics(trajs))  # rewards that failed (scored 0): errors, timeouts
            m.update(tool_metrics(trajs))  # multi-turn tasks: tool calls, errors, timeouts
            m.update(train_on(cfg, trainer, critic, trajs, teacher))
            t2, c2 = time.perf_counter(), time.thread_time()
            engine_fault = None
            try:
                producer.publish(trainer, trainer.version)
            except RuntimeError as e:  # the engines failed taking the weights: the step is trained, keep it
                if engine_fault_of(e) is None:
                    raise
                engine_fault = e
            t3 = time.perf_counter()
            step += 1
            m.update(stale)
            m.update({f"buffer/{k}": float(v) for k, v in buffer.stats().items()})
            m.update({
                "perf/wait_seconds": t1 - t0,  # waiting for the batch (η = 0: its whole generation)
                "perf/train_seconds_total": t2 - t1,  # batch, proximal log-probs, step (and critic)
                "perf/train_cpu_seconds": c2 - c1,  # CPU time of this thread in that span
                "perf/sync_seconds": t3 - t2,
                "perf/step_seconds": t3 - t0,
                "perf/tokens_per_s": m.get("perf/train_tokens", 0.0) / max(t3 - t0, 1e-9),
                "perf/gen_tokens_per_s": sum(t.num_response_tokens for t in trajs) / max(t3 - t0, 1e-9),
            })
            m["groups"] = [g.index for g in groups]
            if on_step:
                on_step(step, m)
            stop_on_bad_steps(m, cfg.train.max_bad_steps, step)  # NaN/Inf steps in a row: stop before a checkpoint
            if engine_fault is not None:
                raise engine_fault
            out_of_time = time_budget is not None and time.perf_counter() - t_start >= time_budget
            if step == end_step or out_of_time or (cfg.train.save_every and step % cfg.train.save_every == 0):
                save(step)
            if out_of_time:
                break
    except RuntimeError as e:  # a rollout stopped by a fault (the engine process gone): its one line, not the wrap
        fault = engine_fault_of(e)
        # the engines failed between steps: what was trained since the last checkpoint is kept in one, and every
        # checkpoint written before stays (a fixed schedule's checkpoint needs the engine for the batches of older
        # weights: it keeps its last one)
        if fault is not None and not fixed and step > saved[0]:
            try:
                save(step, keep_all=True)
            except Exception as save_error:  # noqa: BLE001 - the engine fault is the error to report
                log.warning("no checkpoint at step %d after the engine fault: %s", step, save_error)
        if fault is not None and fault is not e:
            raise fault from None
        raise
    finally:
        producer.stop()
    return step
