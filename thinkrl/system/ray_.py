"""cluster.backend=ray: the inference engines and the trainer as Ray actors, placed on a cluster.

    run_ray(cfg, trainer, engine, workflow, train_samples, start_step, end_step, on_step, checkpoint)

- One placement group: bundle 0 for the trainer ({"CPU": trainer_cpus, "GPU": trainer_gpus}), bundles 1..N for
  the engines ({"CPU": engine_cpus, "GPU": engine_gpus} each), strategy PACK (one node if it fits) or SPREAD.
- EngineActor: an EmbeddedEngine in an async actor (many generate calls in flight). TrainerActor: a TrainEngine.
  Each computes on `actor_device(run.device, its cluster.*_gpus)`: auto is a GPU where the actor reserves one;
  the model and states travel on the CPU and each actor moves its copy to its device.
- The loop (thinkrl.system.loop.run_loop) runs in the driver unchanged: RayEngine and RayTrainer give it the
  InferenceEngine and TrainEngine interfaces over the actors; rewards are computed in the driver.
- Weights go trainer actor -> engine actors through the object store (one ray.put, every engine loads it with
  pause -> update -> resume), never through the driver. The driver's model, optimizer state and local engine
  are brought up to date only when a checkpoint or an evaluation is due, and at the end, so `thinkrl train`
  checkpoints, evaluates and resumes as with the local backend.
Multi-node: start Ray on every node (`ray start --head` on one, `ray start --address=HEAD:6379` on the others),
then run `thinkrl train ... cluster.backend=ray cluster.address=auto` on the head node (docs/async.md).
"""
from __future__ import annotations

import asyncio

import torch

from thinkrl.device import resolve_device
from thinkrl.rollout.base import EngineCaps, InferenceEngine, register_engine
from thinkrl.rollout.weights import as_state_dict, is_path


def _ray():
    try:
        import ray
    except ImportError:
        raise ValueError("cluster.backend=ray needs Ray: pip install 'ray>=2.40'") from None
    return ray


def bundles(c) -> list[dict]:
    """The placement group's bundles for cfg.cluster `c`: the trainer's first, then one per engine."""
    def b(cpu, gpu):
        return {k: v for k, v in (("CPU", cpu), ("GPU", gpu)) if v}

    return [b(c.trainer_cpus, c.trainer_gpus)] + [b(c.engine_cpus, c.engine_gpus)] * c.num_engines


def actor_device(run_device: str, gpus: float) -> torch.device:
    """The device a Ray actor computes on: `run.device` resolved as the local trainer resolves it
    (thinkrl.device.resolve_device), inside an actor that reserves `gpus` GPUs. Ray shows an actor only the GPUs it
    reserved, numbered from 0, so cuda[:N] is the actor's first GPU (cuda) and needs a GPU reserved (config validation
    refuses cuda without one); auto is cuda with a GPU reserved and the CPU (or mps) without; cpu is the CPU."""
    if run_device.split(":")[0] == "cuda":
        if not gpus:
            raise ValueError(f"run.device={run_device!r}: this Ray actor reserves no GPU (cluster.*_gpus = 0)")
        return resolve_device("cuda")
    dev = resolve_device(run_device)
    return torch.device("cpu") if dev.type == "cuda" and not gpus else dev


def to_cpu(obj):
    """Tensors in nested dicts, lists and tuples moved to the CPU (what crosses between actors and the driver, so a
    process without the sender's GPU can load it)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def put_model(ray, model):
    """ray.put of the model with its weights on the CPU (every actor moves its copy to its own device); the
    driver's model goes back to its device, its parameters the same objects (the optimizer's stay valid)."""
    device = next(model.parameters()).device
    model.cpu()
    try:
        return ray.put(model)
    finally:
        model.to(device)


# ============================================================================ actors (plain classes; ray.remote'd lazily)
class EngineActor:
    def __init__(self, model, tokenizer, version: int, threads: int, engine_kwargs: dict, device: str = "cpu",
                 gpus: float = 0.0):
        from thinkrl.rollout.engine import EmbeddedEngine

        torch.set_num_threads(max(1, threads))
        self.device = actor_device(device, gpus)
        self.engine = EmbeddedEngine(model.to(self.device).eval(), tokenizer=tokenizer, version=version,
                                     **engine_kwargs)

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
    """A TrainEngine on `actor_device(device, gpus)`: run.device and the GPUs the actor reserves
    (cluster.trainer_gpus)."""

    def __init__(self, model, tcfg, acfg, state: dict | None, threads: int, autocast_bf16: bool,
                 device: str = "cpu", gpus: float = 0.0):
        from thinkrl.train.engine import TrainEngine

        torch.set_num_threads(max(1, threads))
        self.device = actor_device(device, gpus)
        self.trainer = TrainEngine(model.to(self.device), tcfg, acfg, autocast_bf16=autocast_bf16)
        if state:
            self.trainer.load_state_dict(state)

    def device_name(self) -> str:
        return str(self.device)

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
        return to_cpu(self.trainer.state_dict())


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

    def __init__(self, actor, version: int):
        self.actor, self.version = actor, version
        self.device = torch.device(_ray().get(actor.device_name.remote()))  # where the actor trains

    def logprobs(self, trajs):
        return _ray().get(self.actor.logprobs.remote(trajs))

    def step(self, batch, old_logprobs=None, ref_logprobs=None) -> dict:
        if ref_logprobs is not None:  # config validation refuses algo.kl_coef > 0 with cluster.backend=ray
            raise ValueError("cluster.backend=ray: the trainer actor has no reference model")
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

    def push(self, sd, version: int) -> None:  # weights the driver holds (the fixed schedule keeps them)
        self.engine.load_weights(sd, version)

    def close(self) -> None:
        pass


# ============================================================================ the run
def start_actors(cfg, model, tokenizer, trainer_state: dict | None, version: int):
    """(placement group, trainer actor, engine actors), after ray.init if Ray is not running."""
    ray = _ray()
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    opts = cfg.cluster
    bnd = bundles(opts)
    if not ray.is_initialized():
        local = {} if opts.address else {"num_cpus": opts.num_cpus or int(sum(b.get("CPU", 0) for b in bnd) + 0.999)}
        ray.init(address=opts.address or None, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, **local)
    pg = placement_group(bnd, strategy=opts.placement)
    ray.get(pg.ready(), timeout=300)

    def at(i: int):
        return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=i)

    tcpus, ecpus = max(1, int(opts.trainer_cpus)), max(1, int(opts.engine_cpus))
    model_ref = put_model(ray, model)
    trainer = ray.remote(TrainerActor).options(num_cpus=opts.trainer_cpus, num_gpus=opts.trainer_gpus,
                                               scheduling_strategy=at(0)).remote(
        model_ref, cfg.train, cfg.algo, to_cpu(trainer_state), tcpus, cfg.model.autocast_bf16, cfg.run.device,
        opts.trainer_gpus)
    engines = [ray.remote(EngineActor).options(num_cpus=opts.engine_cpus, num_gpus=opts.engine_gpus,
                                               scheduling_strategy=at(i + 1), max_concurrency=1000).remote(
        model_ref, tokenizer, version, ecpus, {}, cfg.run.device, opts.engine_gpus) for i in range(opts.num_engines)]
    ray.get([trainer.state_dict.remote()] + [e.stats.remote() for e in engines], timeout=600)  # all started
    return pg, trainer, engines


def run_ray(cfg, trainer, engine, workflow, train_samples, start_step: int, end_step: int, on_step=None,
            checkpoint=None, time_budget: float | None = None, critic=None, restore: dict | None = None) -> int:
    """The loop (thinkrl.system.loop.run_loop) with its trainer and engines as Ray actors. `trainer` and
    `engine` are the driver's: they get the actor's weights and optimizer state before a checkpoint or an
    evaluation and at the end."""
    ray = _ray()
    from thinkrl.system.loop import run_loop

    if critic is not None:  # config validation refuses algo.advantage=gae with cluster.backend=ray
        raise ValueError("cluster.backend=ray: a critic (algo.advantage=gae) is not supported on Ray")
    pg, t_actor, e_actors = start_actors(cfg, trainer.model, getattr(workflow, "tokenizer", None),
                                         trainer.state_dict(), trainer.version)
    rtrainer = RayTrainer(t_actor, trainer.version)
    sync = RayWeightSync(rtrainer, RayEngine(e_actors, trainer.version))

    def pull() -> None:
        trainer.model.load_state_dict(rtrainer.export_weights())
        trainer.load_state_dict(rtrainer.state_dict())

    def step_done(step: int, m: dict) -> None:
        if cfg.eval.every and step % cfg.eval.every == 0:
            pull()
        if on_step:
            on_step(step, m)

    def save(step: int, state: dict, keep_all: bool = False) -> None:
        pull()
        if checkpoint:
            checkpoint(step, state, keep_all)

    try:
        last = run_loop(cfg, rtrainer, sync.engine, sync, workflow, train_samples, start_step, end_step, step_done,
                        save, time_budget, restore=restore)
        pull()
    finally:
        for a in e_actors + [t_actor]:
            ray.kill(a)
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(pg)
    return last
