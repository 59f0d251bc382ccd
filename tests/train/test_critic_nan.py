"""The critic's NaN guard: a critic step with NaN/Inf in its loss or gradients is skipped (weights and Adam state
unchanged), counted in critic/skipped_steps and critic/bad_steps_in_row, saved in its state; a good step after it
updates normally; train.max_bad_steps critic steps in a row stop the run; an RL run with one poisoned critic step
goes on and checkpoints the count."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch

import thinkrl.train.critic as critic_mod
from thinkrl.algo.config import AlgoConfig
from thinkrl.config import TrainConfig, load_config
from thinkrl.models.micro import build_micro_model, build_tokenizer
from thinkrl.system.checkpoint import good_checkpoint, load_state
from thinkrl.system.train import train_rl
from thinkrl.train.critic import Critic
from thinkrl.train.engine import NumericalFault, stop_on_bad_steps
from thinkrl.types import Trajectory

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def policy():
    return build_micro_model(build_tokenizer(), hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                             intermediate_size=64, seed=0)


def _trajs() -> list[Trajectory]:
    rng = random.Random(0)
    out = []
    for j in range(4):
        toks = [rng.randrange(8, 100) for _ in range(9)]
        out.append(Trajectory(sample_id="s", group_id="g", tokens=toks, loss_mask=[False] * 4 + [True] * 5,
                              logprobs=[0.0] * 9, versions=[-1] * 4 + [0] * 5, reward=float(j % 2), prompt_len=4))
    return out


def _returns(trajs):
    return [[float(t.reward)] * len(t.tokens) for t in trajs]


def _snapshot(c: Critic):
    adam = c.optimizer.state_dict()["state"]
    return ({k: v.clone() for k, v in c.model.state_dict().items()},
            {i: {k: v.clone() for k, v in s.items()} for i, s in adam.items()})


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _poison(c: Critic, where: str, bad: float, monkeypatch):
    """Make the next critic step's loss (`where` = "loss") or only its gradients ("grad") non-finite; returns undo."""
    if where == "loss":
        real = critic_mod.value_loss

        def poisoned(*a, **k):
            loss, m = real(*a, **k)
            loss = loss * bad
            return loss, {**m, "loss/value": float(loss.detach())}

        monkeypatch.setattr(critic_mod, "value_loss", poisoned)
        return lambda: monkeypatch.setattr(critic_mod, "value_loss", real)
    h = c.model.head.weight.register_hook(lambda g: g * bad)  # a finite loss, non-finite gradients
    return h.remove


@pytest.mark.parametrize("where", ["loss", "grad"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nan_or_inf_critic_step_changes_nothing_is_counted_and_the_next_one_trains(policy, where, bad, monkeypatch):
    c = Critic(policy, AlgoConfig(critic_lr=0.05), TrainConfig(max_tokens_per_mb=4096))
    trajs = _trajs()
    m = c.step(trajs, _returns(trajs))  # a good step first: Adam has state
    assert m["critic/skipped_steps"] == 0 and m["critic/bad_steps_in_row"] == 0
    before = _snapshot(c)
    undo = _poison(c, where, bad, monkeypatch)
    m = c.step(trajs, _returns(trajs))
    undo()
    after = _snapshot(c)
    assert _same(before[0], after[0])  # the weights
    assert before[1].keys() == after[1].keys() and all(_same(before[1][i], after[1][i]) for i in before[1])  # Adam
    assert m["critic/skipped_steps"] == 1 and m["critic/bad_steps_in_row"] == 1
    assert not math.isfinite(m["critic/grad_norm"]) and all(p.grad is None for p in c.model.parameters())
    assert c.steps == 2  # the skipped update still counts toward algo.critic_warmup_steps
    m = c.step(trajs, _returns(trajs))  # the fault is gone: a normal update
    assert not _same(after[0], _snapshot(c)[0]) and math.isfinite(m["critic/grad_norm"])
    assert m["critic/skipped_steps"] == 1 and m["critic/bad_steps_in_row"] == 0
    fresh = Critic(policy, AlgoConfig(critic_lr=0.05), TrainConfig(max_tokens_per_mb=4096))
    fresh.load_state_dict(c.state_dict())
    assert (fresh.guard.skipped_steps, fresh.guard.bad_in_row, fresh.steps) == (1, 0, 3)
    old = {k: v for k, v in c.state_dict().items() if k not in ("skipped_steps", "bad_in_row")}  # an older checkpoint
    fresh.load_state_dict(old)
    assert (fresh.guard.skipped_steps, fresh.guard.bad_in_row) == (0, 0)


def test_each_poisoned_epoch_is_its_own_skipped_step(policy, monkeypatch):
    c = Critic(policy, AlgoConfig(critic_lr=0.05, ppo_epochs=2), TrainConfig(max_tokens_per_mb=4096))
    trajs = _trajs()
    undo = _poison(c, "grad", float("nan"), monkeypatch)
    m = c.step(trajs, _returns(trajs))
    undo()
    assert m["critic/skipped_steps"] == 2 and m["critic/bad_steps_in_row"] == 2


def test_critic_bad_steps_in_a_row_stop_the_run_with_one_line():
    stop_on_bad_steps({"train/bad_steps_in_row": 0.0, "critic/bad_steps_in_row": 2.0}, 3, 5)  # below the limit
    stop_on_bad_steps({"critic/bad_steps_in_row": 9.0}, 0, 5)  # 0: never stop
    with pytest.raises(NumericalFault, match=r"^step 5: 3 critic optimizer steps in a row .*train.max_bad_steps=3"):
        stop_on_bad_steps({"train/bad_steps_in_row": 0.0, "critic/bad_steps_in_row": 3.0}, 3, 5)


TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
        "model.intermediate_size=64", "data.num_train=200", "data.num_eval=4", "rollout.n=4",
        "rollout.batch_prompts=2", "rollout.max_new_tokens=8", "eval.k=0", "log.progress=false", "algo.lr=0.01",
        "run.threads=1", "algo.advantage=gae", "algo.loss=ppo", "rollout.max_staleness=0"]


def test_an_rl_run_with_a_poisoned_critic_step_goes_on_and_checkpoints_the_count(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real, calls = critic_mod.value_loss, [0]

    def nan_on_second_step(*a, **k):  # one micro-batch a step here: call 2 is step 2's
        calls[0] += 1
        loss, m = real(*a, **k)
        if calls[0] == 2:
            loss = loss * float("nan")
            m = {**m, "loss/value": float("nan")}
        return loss, m

    monkeypatch.setattr(critic_mod, "value_loss", nan_on_second_step)
    cfg = load_config(None, TINY + [f"run.output_dir={out}", "train.steps=3", "train.save_every=3",
                                    "train.max_tokens_per_mb=4096", "train.max_bad_steps=2"])
    res = train_rl(cfg)
    assert res["steps"] == 3 and calls[0] == 3
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["critic/skipped_steps"] for r in recs] == [0, 1, 1]
    assert [r["critic/bad_steps_in_row"] for r in recs] == [0, 1, 0]
    assert all(r["train/skipped_steps"] == 0 for r in recs)  # the policy's steps are not the critic's
    ckpt, _ = good_checkpoint(out / "checkpoints")
    state = load_state(ckpt)["critic"]
    assert (state["skipped_steps"], state["bad_in_row"], state["steps"]) == (1, 0, 3)
