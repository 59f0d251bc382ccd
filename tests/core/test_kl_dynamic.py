"""KL to a reference policy (in the loss and in the reward) and DAPO dynamic sampling, through train_rl."""
import json

import pytest

from thinkrl.config import load_config
from thinkrl.tasks.arithmetic import Arithmetic
from thinkrl.system.train import train_rl

TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
        "model.intermediate_size=64", "data.num_train=200", "data.num_eval=8", "rollout.n=4",
        "rollout.batch_prompts=3", "rollout.max_new_tokens=10", "eval.k=0", "log.progress=false",
        "algo.lr=0.01", "run.threads=1", "train.steps=2", "task.name=test_kl_dynamic:DigitShare"]


class DigitShare(Arithmetic):
    """Arithmetic prompts with a dense toy reward (random micro models never solve them): the share of digits."""

    reward_isolation = "inline"  # a count of characters: cannot hang (no reward worker processes to start)

    def reward(self, response, sample):
        return sum(c.isdigit() for c in response) / max(len(response), 1)


def _metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("in_reward", [False, True])
def test_kl_to_reference(tmp_path, in_reward):
    cfg = load_config(None, TINY + ["algo.kl_coef=0.5", f"algo.kl_in_reward={str(in_reward).lower()}",
                                     f"run.output_dir={tmp_path}"])
    train_rl(cfg)
    recs = _metrics(tmp_path)
    # step 1 is on-policy from the reference weights: KL 0; after one update the policy has moved
    key = "kl/reward_penalty_mean" if in_reward else "kl/mean"
    assert abs(recs[0][key]) < 1e-4
    assert recs[1][key] > 1e-6


def test_dynamic_sampling_fills_the_batch_with_informative_groups(tmp_path):
    cfg = load_config(None, TINY + ["algo.dynamic_sampling=true", "algo.dynamic_max_rounds=3",
                                     f"run.output_dir={tmp_path}"])
    train_rl(cfg)
    for r in _metrics(tmp_path):
        assert 1 <= r["dynamic/rounds"] <= 3
        assert r["group/num"] == 3  # the batch holds batch_prompts groups whatever the rounds
        if r["dynamic/informative_groups"] >= 3:
            assert r["group/uniform_frac"] == 0.0


@pytest.mark.parametrize("in_reward", [False, True])
def test_kl_to_reference_in_async_mode(tmp_path, in_reward):
    cfg = load_config(None, TINY + ["algo.kl_coef=0.5", f"algo.kl_in_reward={str(in_reward).lower()}",
                                     "algo.loss=decoupled_ppo", "rollout.max_staleness=1", "rollout.placement=inline",
                                     "train.steps=3", f"run.output_dir={tmp_path}"])
    train_rl(cfg)
    recs = _metrics(tmp_path)
    key = "kl/reward_penalty_mean" if in_reward else "kl/mean"
    assert abs(recs[0][key]) < 1e-4  # the first batch comes from the reference weights
    # in the reward the penalty uses the engine's log-probs: with eta = 1 step 2 may still be sampled by the
    # reference weights, step 3 is not
    assert recs[2][key] > 1e-6


@pytest.mark.parametrize("extra, match", [
    (["algo.dynamic_sampling=true", "rollout.max_staleness=1", "algo.loss=decoupled_ppo", "run.deterministic=true"],
     "run.deterministic with algo.dynamic_sampling: supported with rollout.max_staleness=0 only"),
    (["rollout.max_staleness=2"], "algo.loss=ppo with rollout.max_staleness=2: off-policy batches need a proximal"),
    (["algo.kl_coef=0.1", "cluster.backend=ray"], "the Ray backend has no reference model"),
    (["algo.advantage=gae", "cluster.backend=ray"], "the Ray backend has no critic"),
    (["rollout.max_staleness=1", "algo.loss=decoupled_ppo", "rollout.engine=hf"], "rollout.engine=hf shares"),
    (["rollout.weight_sync=memory", "rollout.placement=process"], "rollout.weight_sync=memory: needs the engine"),
    (["train.world_size=2", "rollout.max_staleness=1", "algo.loss=decoupled_ppo"], "train.world_size > 1: data-par"),
    (["cluster.backend=ray", "cluster.trainer_cpus=0"], "each actor needs a resource"),
])
def test_unsupported_combinations_fail_at_config_load(extra, match):
    from thinkrl.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        load_config(None, TINY + extra)
