"""cluster.backend=ray: options and placement bundles (fast), and a few real steps on a local Ray (slow)."""
from __future__ import annotations

import json

import pytest
import torch

from thinkrl.config import ConfigError, load_config
from thinkrl.system.ray_ import TrainerActor, actor_device, bundles, put_model, to_cpu

TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
        "model.intermediate_size=64", "data.num_train=200", "data.num_eval=8", "rollout.n=4",
        "rollout.batch_prompts=4", "rollout.max_new_tokens=12", "eval.k=0", "log.progress=false",
        "algo.lr=0.01", "run.threads=1"]


def test_bundles_and_option_errors():
    cfg = load_config(None, ["cluster.backend=ray", "cluster.num_engines=2", "cluster.engine_cpus=1",
                             "cluster.trainer_cpus=2", "cluster.trainer_gpus=1"])
    assert bundles(cfg.cluster) == [{"CPU": 2, "GPU": 1}, {"CPU": 1}, {"CPU": 1}]
    for kw, needle in [("num_engines=0", "cluster.num_engines"), ("placement=ANYWHERE", "cluster.placement"),
                       ("engine_gpus=-1", "cluster.engine_gpus"), ("trainer_cpus=0", "each actor needs")]:
        with pytest.raises(ConfigError, match=needle):
            load_config(None, ["cluster.backend=ray", f"cluster.{kw}"])



def test_actor_device_follows_run_device(monkeypatch):
    """The Ray actors' device comes from run.device as the local trainer's does (thinkrl.device.resolve_device),
    given the GPUs the actor reserves; checked with CUDA absent (this machine) and faked present."""
    assert [actor_device(d, g) for d, g in [("cpu", 0), ("cpu", 1), ("auto", 0)]] == [torch.device("cpu")] * 3
    with pytest.raises(ValueError, match="reserves no GPU"):
        actor_device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert actor_device("auto", 1) == torch.device("cuda")  # as resolve_device("auto") locally
    assert actor_device("cuda:3", 0.5) == torch.device("cuda")  # Ray numbers an actor's own GPUs from 0
    assert actor_device("auto", 0) == torch.device("cpu")  # no GPU reserved: the CPU, even where CUDA is visible
    assert actor_device("cpu", 1) == torch.device("cpu")


def test_cuda_without_reserved_gpus_is_refused_at_load():
    with pytest.raises(ConfigError, match="run.device=cuda with cluster.backend=ray"):
        load_config(None, ["cluster.backend=ray", "run.device=cuda", "cluster.trainer_gpus=1"])
    cfg = load_config(None, ["cluster.backend=ray", "run.device=cuda", "cluster.trainer_gpus=1",
                             "cluster.engine_gpus=1"])
    assert bundles(cfg.cluster)[0] == {"CPU": 1.0, "GPU": 1.0}


def test_trainer_actor_trains_on_its_device_and_states_travel_on_the_cpu():
    """TrainerActor as a plain class (no Ray): its TrainEngine's device is actor_device(run.device, gpus); the model
    goes to Ray with CPU weights and comes back to the driver's device with the same parameter objects."""
    from thinkrl.system.setup import build_run

    cfg = load_config(None, TINY + ["run.device=cpu"])
    model = build_run(cfg).model
    params = list(model.parameters())

    class FakeRay:
        def put(self, m):
            self.devices = {p.device.type for p in m.parameters()}
            return "ref"

    ray = FakeRay()
    assert put_model(ray, model) == "ref" and ray.devices == {"cpu"}
    assert all(a is b for a, b in zip(params, model.parameters()))
    actor = TrainerActor(model, cfg.train, cfg.algo, None, 1, False, cfg.run.device, cfg.cluster.trainer_gpus)
    assert actor.trainer.device == torch.device("cpu") and actor.device_name() == "cpu"
    state = actor.state_dict()
    assert state["version"] == actor.trainer.version
    assert to_cpu({"a": [torch.ones(1)], "b": (torch.zeros(1), 3)})["b"][1] == 3


@pytest.mark.slow
def test_a_few_steps_on_local_ray(tmp_path):
    ray = pytest.importorskip("ray")
    import thinkrl.system.train as T

    cfg = load_config(None, TINY + [f"run.output_dir={tmp_path}", "train.steps=3", "algo.loss=decoupled_ppo",
                                    "rollout.max_staleness=1", "algo.entropy_coef=0.01",  # a gradient
                                    "cluster.backend=ray", "cluster.num_engines=1", "cluster.engine_cpus=1",
                                    "cluster.trainer_cpus=1", "cluster.num_cpus=2"])
    try:
        res = T.train_rl(cfg)
    finally:
        ray.shutdown()
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert all(r["staleness/max"] <= 1 for r in recs) and res["steps"] == 3
    # the driver's checkpoint holds the weights and optimizer state of the trainer actor
    from safetensors.torch import load_file

    state = torch.load(tmp_path / "checkpoints" / "step_000003" / "trainer_state.pt", weights_only=False)
    assert state["trainer"]["version"] == 3
    assert {float(v["step"]) for v in state["trainer"]["optimizer"]["state"].values()} == {3.0}

    w = load_file(str(tmp_path / "checkpoints" / "step_000003" / "model.safetensors"))
    init = load_config(None, TINY)
    from thinkrl.system.setup import build_run

    w0 = build_run(init).model.state_dict()
    assert max((w[k] - w0[k]).abs().max().item() for k in w) > 1e-4
