"""cluster.backend=ray: options and placement bundles (fast), and a few real steps on a local Ray (slow)."""
from __future__ import annotations

import json

import pytest
import torch

from thinkrl.config import ConfigError, load_config
from thinkrl.system.ray_ import bundles

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
