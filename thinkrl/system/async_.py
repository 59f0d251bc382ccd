"""The asynchronous RL controller: rollout runs ahead of training under a staleness bound η.

    last = run_async(cfg, engine, workflow, trainer, train_samples, start_step, end_step, on_step)

- A producer (an asyncio loop on a background thread) keeps the engine saturated: it starts prompt groups
  (one prompt, rollout.n answers) as long as the bound allows and puts finished, rewarded groups in a buffer.
- The trainer (this thread) takes a batch of rollout.batch_prompts groups as soon as one may be taken, trains,
  and pushes the new weights to the engine without waiting for in-flight sequences (pause -> update -> resume):
  those continue with the new weights (partial rollout) and each token carries the version that produced it.
- Units: the bound counts prompt groups; a batch is B = rollout.batch_prompts groups (B x n samples). Group j
  is prompt j % B of the sync loop's step j // B, so both loops see the same prompts in the same order.
- Bound: with trainer version v (steps done), group j may start only when j < (η + v + 1) x B. The version
  of a group is the policy version when it started (= the lowest version of its tokens); its staleness when
  trained at version V is V - version. The trainer never trains a group with staleness > η: it takes the B
  finished groups started earliest (earliest deadline first) and WAITS while taking them would leave a group
  that could no longer be trained in time (see `StalenessBuffer.take`). Nothing is dropped. With η = 0 this
  is exactly the synchronous loop (tested).
- With η > 0 the `ppo` loss becomes decoupled PPO: the clip is taken against the proximal policy (the trainer's
  weights before the step) and the engine's (behaviour) log-probs enter through an importance weight, tokens
  whose weight exceeds algo.behav_weight_cap (default 5 here) dropped. With one optimizer step per batch the
  proximal log-probs come from the step's own forward (`decoupled_ppo_inline`), else from a recompute pass.
- Admission (rollout.admission): `eager` starts every group the bound allows. `adaptive` (default) does too
  while the trainer has to wait for data; once it finds its batch ready twice in a row (training is the
  bottleneck), at most one batch of groups is started ahead of the trainer until it has to wait again. Starting
  more then buys no throughput (every sample is trained, at the trainer's pace): it only makes samples wait in
  the buffer and grow stale. The bound η still caps staleness either way.
- Sampling seeds are a function of (run.seed, j): a group's samples do not depend on what runs beside it.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from thinkrl.algo.batch import gae_targets, make_batch


from thinkrl.data import batch_for_step
from thinkrl.types import Trajectory

PLACEMENTS = ("auto", "inline", "process")
DEFAULT_BEHAV_CAP = 5.0


@dataclass
class Group:
    index: int  # global group index j
    version: int  # policy version when it started
    trajs: list[Trajectory] | None = None  # None while in flight


class StalenessBuffer:
    """Admission (how many groups may start) and the trainer's pick, under staleness bound η. Thread-safe.
    `adaptive`: after READY_STREAK takes in a row found their batch ready, at most B groups are started and not
    yet taken (one batch ahead); a take that has to wait lifts that at once (`on_lift` wakes the producer) until
    the streak builds again."""

    READY_STREAK = 2

    def __init__(self, batch_groups: int, eta: int, start_step: int = 0, version: int = 0, adaptive: bool = False):
        if batch_groups < 1 or eta < 0:
            raise ValueError(f"StalenessBuffer: need batch_groups >= 1 and eta >= 0, got {batch_groups}, {eta}")
        self.B, self.eta, self.step, self.version = batch_groups, eta, start_step, version
        self.next_index = start_step * batch_groups
        self.groups: dict[int, Group] = {}  # started, not yet trained
        self.error: BaseException | None = None
        self.adaptive, self._streak = adaptive, 0  # streak: takes in a row that found their batch ready
        self.on_lift: Callable[[], None] | None = None  # called when adaptive admission reopens the bound
        self._cv = threading.Condition()

    @property
    def lazy(self) -> bool:
        """Adaptive admission holds the producer to one batch ahead of the trainer."""
        return self.adaptive and self._streak >= self.READY_STREAK

    # ---------------------------------------------------------------- producer side
    def may_start(self) -> bool:
        if self.next_index >= (self.eta + self.step + 1) * self.B:
            return False
        return not self.lazy or len(self.groups) < self.B

    def try_start(self) -> Group | None:
        with self._cv:
            if not self.may_start():
                return None
            g = Group(self.next_index, self.version)
            self.groups[g.index] = g
            self.next_index += 1
            return g

    def finish(self, group: Group, trajs: list[Trajectory]) -> None:
        with self._cv:
            group.trajs = trajs
            self._cv.notify_all()

    def fail(self, error: BaseException) -> None:
        with self._cv:
            self.error = self.error or error
            self._cv.notify_all()

    # ---------------------------------------------------------------- trainer side
    def pick(self) -> list[Group] | None:
        """The batch to train at the current version, or None to wait. Earliest deadline (start version) first;
        feasible iff, for u = 0..η, the groups left behind whose deadline (version + η) is at most
        version + u number at most u x B (later batches must be able to take them in time)."""
        done = sorted((g for g in self.groups.values() if g.trajs is not None), key=lambda g: (g.version, g.index))
        if len(done) < self.B:
            return None
        batch = done[: self.B]
        chosen = {g.index for g in batch}
        left = [g.version + self.eta - self.version for g in self.groups.values() if g.index not in chosen]
        for u in range(self.eta + 1):
            if sum(d <= u for d in left) > u * self.B:
                return None
        return sorted(batch, key=lambda g: g.index)

    def take(self, timeout: float | None = None) -> list[Group]:
        """Block until `pick` gives a batch; remove and return it."""
        with self._cv:
            waited = self.error is None and self.pick() is None
            if waited:  # generation is behind: adaptive admission opens the full bound at once
                lifted, self._streak = self.lazy, 0
                if lifted and self.on_lift is not None:
                    self.on_lift()
            ok = self._cv.wait_for(lambda: self.error is not None or self.pick() is not None, timeout)
            if self.error is not None:
                raise RuntimeError(f"rollout failed: {self.error}") from self.error
            if not ok:
                raise TimeoutError(f"no batch after {timeout} s ({self.stats()})")
            if not waited:
                self._streak += 1
            batch = self.pick()
            for g in batch:
                del self.groups[g.index]
            return batch

    def advance(self, version: int) -> None:
        """A train step is done and `version` is loaded in the engines: the bound grows by B."""
        with self._cv:
            self.step += 1
            self.version = version
            self._cv.notify_all()

    def stats(self) -> dict:
        done = sum(g.trajs is not None for g in self.groups.values())
        return {"finished": done, "in_flight": len(self.groups) - done, "started": self.next_index,
                "lazy": int(self.lazy)}


def group_seed(seed: int, index: int) -> int:
    """The sampling seed of group `index` (a pure function: reproducible whatever runs beside it)."""
    return (seed * 1_000_003 + index * 0x9E3779B1 + 0x5BD1E995) & 0xFFFFFFFF


class SeededEngine:
    """An engine view whose generate() uses a fixed sampling seed (when the params have none)."""

    def __init__(self, engine, seed: int):
        self._engine, self._seed = engine, seed

    async def generate(self, input_ids, params=None, n: int = 1):
        if params is not None and params.seed is None:
            params = dataclasses.replace(params, seed=self._seed)
        return await self._engine.generate(input_ids, params, n)

    def __getattr__(self, name):
        return getattr(self._engine, name)


class Producer:
    """Starts groups whenever the buffer allows, on an asyncio loop in a background thread."""

    def __init__(self, buffer: StalenessBuffer, engine, workflow, sample_of: Callable[[int], object],
                 seed: int, steps_per_group: int):
        self.buffer, self.engine, self.workflow, self.sample_of = buffer, engine, workflow, sample_of
        self.seed, self.B = seed, steps_per_group
        self.loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stop = False
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="thinkrl-producer", daemon=True)

    def start(self) -> Producer:
        self._thread.start()
        self._ready.wait()
        return self

    def wakeup(self) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._wake.set)

    def stop(self) -> None:
        self._stop = True
        self.wakeup()
        self._thread.join(timeout=60)

    async def _main(self) -> None:
        self.loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        self._ready.set()
        tasks: set[asyncio.Task] = set()
        while not self._stop:
            g = self.buffer.try_start()
            if g is None:
                await self._wake.wait()
                self._wake.clear()
                continue
            t = asyncio.ensure_future(self._episode(g))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _episode(self, g: Group) -> None:
        try:
            sample = self.sample_of(g.index)
            eng = SeededEngine(self.engine, group_seed(self.seed, g.index))
            trajs = await self.workflow.run_episode(eng, sample, f"{g.index // self.B}:{sample.id}")
            self.buffer.finish(g, list(trajs or []))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # the trainer re-raises it
            self.buffer.fail(e)


# ============================================================================ options
@dataclass
class AsyncOptions:
    placement: str = "auto"  # inline (the engine passed in, as is) | process (an engine process) | auto
    weight_sync: str = "auto"  # auto | memory | shm | disk | dist | engine (thinkrl.rollout.weights)
    engine_threads: int = 1  # torch threads of the engine process
    trainer_threads: int = 0  # torch threads of the trainer with an engine process (0: cores - engine_threads)
    weights_dir: str = ""  # disk transport: where the safetensors go (empty: a temporary directory)

    @classmethod
    def from_config(cls, cfg) -> AsyncOptions:
        r = cfg.rollout
        return cls(placement=getattr(r, "placement", "auto"), weight_sync=getattr(r, "weight_sync", "auto"),
                   engine_threads=getattr(r, "engine_threads", 1), trainer_threads=cfg.run.threads,
                   weights_dir=getattr(r, "weights_dir", "")).validate()

    def validate(self) -> AsyncOptions:
        from thinkrl.rollout.weights import SYNC_KINDS

        if self.placement not in PLACEMENTS:
            raise ValueError(f"rollout.placement: unknown value {self.placement!r}; valid: {', '.join(PLACEMENTS)}")
        if self.weight_sync not in SYNC_KINDS:
            raise ValueError(f"rollout.weight_sync: unknown value {self.weight_sync!r}; valid: {', '.join(SYNC_KINDS)}")
        if self.engine_threads < 1:
            raise ValueError(f"rollout.engine_threads: must be >= 1, got {self.engine_threads}")
        return self


def async_algo_config(acfg, eta: int):
    """η > 0 with the `ppo` loss: decoupled PPO, the proximal policy being the trainer's weights before the step
    (`decoupled_ppo_inline` with one epoch; `decoupled_ppo` with recomputed proximal log-probs otherwise)."""
    if eta == 0 or acfg.loss != "ppo":
        return acfg
    return dataclasses.replace(acfg, loss="decoupled_ppo_inline" if acfg.ppo_epochs == 1 else "decoupled_ppo",
                               tis_level="none", behav_weight_cap=acfg.behav_weight_cap or DEFAULT_BEHAV_CAP)


def needs_old_logprobs(acfg) -> bool:
    return acfg.ppo_epochs > 1 or acfg.loss == "decoupled_ppo" or acfg.tis_level != "none"


def staleness_metrics(trajs: list[Trajectory], version: int, eta: int) -> dict[str, float]:
    """Per trajectory: version - lowest version of its generated tokens. Mean, max, histogram (fractions)."""
    st, mixed = [], 0
    for t in trajs:
        vs = [v for v, m in zip(t.versions, t.loss_mask) if m and v >= 0] or [version]
        st.append(version - min(vs))
        mixed += min(vs) != max(vs)
    n = max(len(st), 1)
    m = {"staleness/mean": sum(st) / n, "staleness/max": float(max(st, default=0)), "staleness/mixed_frac": mixed / n}
    m.update({f"staleness/frac_{k}": sum(s == k for s in st) / n for k in range(eta + 1)})
    return m


def _sample_lookup(cfg, train_samples, B: int) -> Callable[[int], object]:
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


def _rollout_engine(cfg, engine, trainer, workflow, opts: AsyncOptions):
    """(engine the producer uses, whether run_async owns it)."""
    placement = opts.placement
    if placement == "auto":
        placement = "process" if cfg.rollout.engine == "embedded" else "inline"
    if placement == "inline":
        if engine.caps.shares_trainer_weights:
            raise ValueError("rollout.engine=hf shares the trainer's weights: async needs rollout.engine=embedded "
                             "(or rollout.placement=process)")
        return engine, False
    from thinkrl.rollout.process import ProcessEngine

    if opts.weight_sync == "memory":
        raise ValueError("rollout.weight_sync=memory: needs rollout.placement=inline (the engine in this process)")
    transport = opts.weight_sync if opts.weight_sync in ("shm", "disk", "dist") else "shm"
    eng = ProcessEngine(trainer.model, getattr(workflow, "tokenizer", None), version=trainer.version,
                        threads=opts.engine_threads, transport=transport, weights_dir=opts.weights_dir or None)
    return eng, True


# ============================================================================ the controller
def run_async(cfg, engine, workflow, trainer, train_samples, start_step: int, end_step: int,
              on_step: Callable[[int, dict], None] | None = None, time_budget: float | None = None,
              critic=None, options: AsyncOptions | None = None, sync=None) -> int:
    """Steps [start_step, end_step) (or until time_budget seconds). Returns the last finished step.
    `critic`: as in run_sync (algo.advantage=gae). `sync` (a thinkrl.rollout.weights.WeightSync): how weights
    reach `engine`, used as given (Ray)."""
    from thinkrl.rollout.weights import WeightSync, make_weight_sync

    opts = (options or AsyncOptions.from_config(cfg)).validate()
    B, eta = cfg.rollout.batch_prompts, cfg.rollout.max_staleness
    base_acfg, old_threads = trainer.acfg, torch.get_num_threads()
    rollout, owned = (engine, False) if sync is not None else _rollout_engine(cfg, engine, trainer, workflow, opts)
    acfg = trainer.acfg = async_algo_config(base_acfg, eta)
    if owned and getattr(trainer, "device", torch.device("cpu")).type == "cpu":  # split the cores
        torch.set_num_threads(opts.trainer_threads or max(1, (os.cpu_count() or 2) - opts.engine_threads))
    # an engine process loads with its own transport (ProcessEngine.transport); others per rollout.weight_sync
    if sync is None:
        sync = WeightSync([rollout]) if owned else make_weight_sync(opts.weight_sync, [rollout], opts.weights_dir or None)
    buffer = StalenessBuffer(B, eta, start_step, trainer.version,
                             adaptive=cfg.rollout.admission == "adaptive")
    producer = Producer(buffer, rollout, workflow, _sample_lookup(cfg, train_samples, B), cfg.run.seed, B).start()
    buffer.on_lift = producer.wakeup
    t_start = time.perf_counter()
    step, local_stale = start_step, False
    try:
        while step < end_step:
            t0 = time.perf_counter()
            groups = buffer.take()
            t1, c1 = time.perf_counter(), time.thread_time()
            trajs = [t for g in groups for t in g.trajs]
            version = trainer.version
            stale = staleness_metrics(trajs, version, eta)
            if stale["staleness/max"] > eta:  # the buffer guarantees this; never train on it if it breaks
                raise RuntimeError(f"staleness {stale['staleness/max']} > rollout.max_staleness={eta}")
            values = critic.values(trajs) if critic is not None else None
            ref = trainer.ref_logprobs(trajs) if acfg.kl_coef > 0 else None
            batch = make_batch(trajs, acfg, cfg.rollout.max_new_tokens, values=values, ref_logprobs=ref)
            old = trainer.logprobs(batch.trajectories) if needs_old_logprobs(acfg) else None
            m = dict(batch.metrics)
            if critic is None or not critic.warming_up:
                # only with a KL term in the loss: trainers without a reference model (Ray's) take no such argument
                kl = {} if ref is None or acfg.kl_in_reward else {"ref_logprobs": ref}
                m.update(trainer.step(batch, old_logprobs=old, **kl))
            if critic is not None:
                targets = gae_targets(trajs, acfg, cfg.rollout.max_new_tokens, values)
                m.update(critic.step(trajs, targets, old_values=values))
            t2, c2 = time.perf_counter(), time.thread_time()
            sync.push_from(trainer, trainer.version)
            local_stale = owned
            buffer.advance(trainer.version)
            producer.wakeup()
            t3 = time.perf_counter()
            step += 1
            if owned and (step >= end_step or (cfg.eval.every and step % cfg.eval.every == 0)):
                engine.load_weights(trainer.export_weights(), trainer.version)  # the engine that evaluates
                local_stale = False
            m.update(stale)
            m.update({f"buffer/{k}": float(v) for k, v in buffer.stats().items()})
            m.update({
                "perf/wait_seconds": t1 - t0,
                "perf/train_seconds_total": t2 - t1,  # batch, proximal log-probs, step (and critic)
                "perf/train_cpu_seconds": c2 - c1,  # CPU time of this thread in that span
                "perf/sync_seconds": t3 - t2,
                "perf/step_seconds": t3 - t0,
                "perf/tokens_per_s": m.get("perf/train_tokens", 0.0) / max(t3 - t0, 1e-9),
                "perf/gen_tokens_per_s": sum(t.num_response_tokens for t in trajs) / max(t3 - t0, 1e-9),
            })
            if on_step:
                on_step(step, m)
            if time_budget is not None and time.perf_counter() - t_start >= time_budget:
                break
    finally:
        producer.stop()
        if local_stale:
            engine.load_weights(trainer.export_weights(), trainer.version)
        sync.close()
        if owned:
            rollout.close()
        trainer.acfg = base_acfg
        torch.set_num_threads(old_threads)
    return step


def run_rl(cfg, engine, workflow, trainer, train_samples, start_step: int, end_step: int,
           on_step: Callable[[int, dict], None] | None = None, time_budget: float | None = None, critic=None) -> int:
    """The controller named by the config: sync, async, or async with Ray actors (cluster.backend=ray)."""
    backend = getattr(getattr(cfg, "cluster", None), "backend", "local")
    args = (cfg, engine, workflow, trainer, train_samples, start_step, end_step, on_step, time_budget)
    if backend == "ray":
        if critic is not None:
            raise ValueError("cluster.backend=ray: algo.advantage=gae (a critic) is not supported on Ray yet")
        from thinkrl.system.ray_ import run_ray

        return run_ray(*args)
    if backend != "local":
        raise ValueError(f"cluster.backend: unknown value {backend!r}; valid: local, ray")
    if cfg.rollout.mode == "async":
        return run_async(*args, critic=critic)
    from thinkrl.system.sync import run_sync

    return run_sync(*args, critic=critic)
