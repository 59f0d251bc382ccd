"""cluster.backend=ray: the inference engines and the trainer as Ray actors, placed on a cluster.

    run_ray(cfg, engine, workflow, trainer, train_samples, start_step, end_step, on_step)

- One placement group: bundle 0 for the trainer ({"CPU": trainer_cpus, "GPU": trainer_gpus}), bundles 1..N for
  the engines ({"CPU": engine_cpus, "GPU": engine_gpus} each), strategy PACK (one node if it fits) or SPREAD.
- EngineActor: an EmbeddedEngine in an async actor (many generate calls in flight). TrainerActor: a TrainEngine.
- The async controller (thinkrl.system.async_.run_async) runs in the driver unchanged: RayEngine and RayTrainer
  give it the InferenceEngine and TrainEngine interfaces over the actors; rewards are computed in the driver.
- Weights go trainer actor -> engine actors through the object store (one ray.put, every engine loads it with
  pause -> update -> resume), never through the driver. The driver's model, optimizer state and local engine
  are brought up to date only when a checkpoint or an evaluation is due, and at the end, so `thinkrl train`
  checkpoints, evaluates and resumes as with the local backend.
Multi-node: start Ray on every node (`ray start --head` on one, `ray start --address=HEAD:6379` on the others),
then run `thinkrl train ... cluster.backend=ray cluster.address=auto` on the head node (docs/async.md).
"""
from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass

import torch

from thinkrl.rollout.base import EngineCaps, InferenceEngine, register_engine
from thinkrl.rollout.weights import as_state_dict, is_path

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def _ray():
    try:
        import ray
    except ImportError:
        raise ValueError("cluster.backend=ray needs Ray: pip install 'ray>=2.40'") from None
    return ray


@dataclass
class ClusterOptions:
    address: str = ""  # "" : a local Ray instance; "auto" or host:port: an existing cluster
    num_engines: int = 1
    engine_cpus: float = 1.0
    engine_gpus: float = 0.0
    trainer_cpus: float = 1.0
    trainer_gpus: float = 0.0
    placement: str = "PACK"
    num_cpus: int = 0  # local Ray instance: CPUs to offer (0: the bundles' total)

    @classmethod
    def from_config(cls, cfg) -> ClusterOptions:
        c = getattr(cfg, "cluster", None)
        return cls(**{f.name: getattr(c, f.name) for f in dataclasses.fields(cls) if hasattr(c, f.name)}).validate()

    def validate(self) -> ClusterOptions:
        if self.num_engines < 1:
            raise ValueError(f"cluster.num_engines: must be >= 1, got {self.num_engines}")
        for k in ("engine_cpus", "engine_gpus", "trainer_cpus", "trainer_gpus"):
            if getattr(self, k) < 0:
                raise ValueError(f"cluster.{k}: must be >= 0, got {getattr(self, k)}")
        if self.engine_cpus + self.engine_gpus == 0 or self.trainer_cpus + self.trainer_gpus == 0:
            raise ValueError("cluster.engine_cpus/engine_gpus and trainer_cpus/trainer_gpus: each actor needs a resource")
        if self.placement not in STRATEGIES:
            raise ValueError(f"cluster.placement: unknown value {self.placement!r}; valid: {', '.join(STRATEGIES)}")
        return self

    def bundles(self) -> list[dict]:
        def b(cpu, gpu):
            return {k: v for k, v in (("CPU", cpu), ("GPU", gpu)) if v}

        return [b(self.trainer_cpus, self.trainer_gpus)] + [b(self.engine_cpus, self.engine_gpus)] * self.num_engines


# ============================================================================ actors (plain classes; ray.remote'd lazily)
class EngineActor:
    def __init__(self, model, tokenizer, version: int, threads: int, engine_kwargs: dict):
        from thinkrl.rollout.engine import EmbeddedEngine

        torch.set_num_threads(max(1, threads))
        self.engine = EmbeddedEngine(model.eval(), tokenizer=tokenizer, version=version, **engine_kwargs)

    async def generate(self, input_ids, params, n: int = 1):
        return await self.engine.generate(input_ids, params, n)

    async def pause(self, mode: str) -> None:
        await asyncio.to_thread(self.engine.pause, mode)

    async def update_weights(self, src, version: int) -> int:  # a state dict or a safetensors path
        await asyncio.to_thread(self.engine.update_weights, src, version)
        return version

    async def resume(self) -> None:
        self.engine.resume()

    async def load_weights(self, src, version: int) -> int:
        await asyncio.to_thread(self.engine.load_weights, src, version)
        return version

    async def stats(self) -> dict:
        return {**self.engine.stats(), "version": self.engine.version, "threads": torch.get_num_threads()}


class TrainerActor:
    def __init__(self, model, tcfg, acfg, state: dict | None, threads: int, autocast_bf16: bool):
        import importlib

        from thinkrl.train.engine import TrainEngine

        importlib.import_module("thinkrl.system.async_")  # registers the decoupled_ppo_inline loss in this process

        torch.set_num_threads(max(1, threads))
        self.trainer = TrainEngine(model, tcfg, acfg, autocast_bf16=autocast_bf16)
        if state:
            self.trainer.load_state_dict(state)

    def set_algo(self, acfg) -> None:
        self.trainer.acfg = acfg

    def logprobs(self, trajs):
        return self.trainer.logprobs(trajs)

    def step(self, batch, old_logprobs):
        return self.trainer.step(batch, old_logprobs=old_logprobs), self.trainer.version

    def push_weights(self, engines, version: int) -> int:
        import ray

        ref = ray.put({k: v.detach().cpu() for k, v in self.trainer.export_weights().items()})
        ray.get([e.load_weights.remote(ref, version) for e in engines])
        return version

    def export_weights(self):
        return {k: v.detach().cpu() for k, v in self.trainer.export_weights().items()}

    def state_dict(self):
        return self.trainer.state_dict()


# ============================================================================ driver-side clients
@register_engine("ray", placement=True)
class RayEngine(InferenceEngine):
    """The InferenceEngine contract over engine actors; each request goes to the actor with the fewest in flight."""

    caps = EngineCaps(in_process=False, pause_modes=("in_place", "abort"), transports=("object_store", "disk"),
                      mid_sequence_update=True)

    def __init__(self, actors, version: int = 0):
        super().__init__(version)
        self.actors = list(actors)
        self.load = [0] * len(self.actors)

    @classmethod
    def from_config(cls, cfg, model, tokenizer, version: int = 0) -> RayEngine:
        raise ValueError("the Ray engine's actors start with the trainer actor's (run_ray, cluster.backend=ray)")

    async def generate(self, input_ids, params=None, n: int = 1):
        i = min(range(len(self.actors)), key=self.load.__getitem__)
        self.load[i] += n
        try:
            return await self.actors[i].generate.remote(list(input_ids), params, n)
        finally:
            self.load[i] -= n

    def update_weights(self, src, version: int) -> None:
        """A safetensors path every actor can read, or a state dict (one ray.put for all actors)."""
        ray = _ray()
        ref = str(src) if is_path(src) else ray.put({k: v.detach().cpu() for k, v in as_state_dict(src).items()})
        ray.get([a.update_weights.remote(ref, version) for a in self.actors])
        self.version = version

    def pause(self, mode: str | None = None) -> None:
        mode = self.resolve_pause_mode(mode or self.pause_mode)
        _ray().get([a.pause.remote(mode) for a in self.actors])

    def resume(self) -> None:
        _ray().get([a.resume.remote() for a in self.actors])

    def stats(self) -> list[dict]:
        return _ray().get([a.stats.remote() for a in self.actors])


class RayTrainer:
    """The part of TrainEngine the async controller uses, over a trainer actor."""

    def __init__(self, actor, acfg, version: int):
        self.actor, self._acfg, self.version = actor, acfg, version
        self.device = torch.device("cpu")

    @property
    def acfg(self):
        return self._acfg

    @acfg.setter
    def acfg(self, value) -> None:
        _ray().get(self.actor.set_algo.remote(value))
        self._acfg = value

    def logprobs(self, trajs):
        return _ray().get(self.actor.logprobs.remote(trajs))

    def step(self, batch, old_logprobs=None) -> dict:
        metrics, self.version = _ray().get(self.actor.step.remote(batch, old_logprobs))
        return metrics

    def export_weights(self):
        return _ray().get(self.actor.export_weights.remote())

    def state_dict(self):
        return _ray().get(self.actor.state_dict.remote())


class RayWeightSync:
    """Trainer actor -> engine actors through the object store (the driver never holds the weights)."""

    name = "ray"

    def __init__(self, trainer: RayTrainer, engine: RayEngine):
        self.trainer, self.engine = trainer, engine

    def push_from(self, trainer, version: int) -> None:
        _ray().get(self.trainer.actor.push_weights.remote(self.engine.actors, version))
        self.engine.version = version

    def close(self) -> None:
        pass


# ============================================================================ the run
def start_actors(cfg, model, tokenizer, trainer_state: dict | None, version: int, opts: ClusterOptions):
    """(placement group, trainer actor, engine actors), after ray.init if Ray is not running."""
    ray = _ray()
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundles = opts.bundles()
    if not ray.is_initialized():
        local = {} if opts.address else {"num_cpus": opts.num_cpus or int(sum(b.get("CPU", 0) for b in bundles) + 0.999)}
        ray.init(address=opts.address or None, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, **local)
    pg = placement_group(bundles, strategy=opts.placement)
    ray.get(pg.ready(), timeout=300)

    def at(i: int):
        return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=i)

    tcpus, ecpus = max(1, int(opts.trainer_cpus)), max(1, int(opts.engine_cpus))
    model_ref = ray.put(model)
    trainer = ray.remote(TrainerActor).options(num_cpus=opts.trainer_cpus, num_gpus=opts.trainer_gpus,
                                               scheduling_strategy=at(0)).remote(
        model_ref, cfg.train, cfg.algo, trainer_state, tcpus, cfg.model.autocast_bf16)
    engines = [ray.remote(EngineActor).options(num_cpus=opts.engine_cpus, num_gpus=opts.engine_gpus,
                                               scheduling_strategy=at(i + 1), max_concurrency=1000).remote(
        model_ref, tokenizer, version, ecpus, {}) for i in range(opts.num_engines)]
    ray.get([trainer.state_dict.remote()] + [e.stats.remote() for e in engines], timeout=600)  # all started
    return pg, trainer, engines


def run_ray(cfg, engine, workflow, trainer, train_samples, start_step: int, end_step: int,
            on_step=None, time_budget: float | None = None) -> int:
    """The async controller (η = rollout.max_staleness; rollout.mode=sync runs it with η = 0) on Ray actors.
    `trainer` and `engine` are the driver's: they receive the weights (and optimizer state) when a checkpoint
    or an evaluation is due and at the end."""
    ray = _ray()
    from thinkrl.system.async_ import AsyncOptions, run_async

    opts = ClusterOptions.from_config(cfg)
    if cfg.train.world_size > 1:
        raise ValueError("train.world_size > 1 with cluster.backend=ray: one trainer rank per run for now")
    pg, t_actor, e_actors = start_actors(cfg, trainer.model, getattr(workflow, "tokenizer", None),
                                         trainer.state_dict(), trainer.version, opts)
    rtrainer = RayTrainer(t_actor, trainer.acfg, trainer.version)
    rengine = RayEngine(e_actors, trainer.version)
    sync = RayWeightSync(rtrainer, rengine)

    def pull() -> None:
        sd = rtrainer.export_weights()
        trainer.model.load_state_dict(sd)
        trainer.load_state_dict(rtrainer.state_dict())
        if engine is not None:
            engine.load_weights(trainer.export_weights(), trainer.version)

    def wrapped(step: int, m: dict) -> None:
        save, every = cfg.train.save_every, cfg.eval.every
        if (save and step % save == 0) or (every and step % every == 0):
            pull()
        if on_step:
            on_step(step, m)

    if cfg.rollout.mode == "sync":
        cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, max_staleness=0))
    try:
        last = run_async(cfg, rengine, workflow, rtrainer, train_samples, start_step, end_step, wrapped, time_budget,
                         options=AsyncOptions(placement="inline"), sync=sync)
        pull()
    finally:
        for a in e_actors + [t_actor]:
            ray.kill(a)
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(pg)
    return last
