"""Rewards that hang or crash cannot stall training: every reward call of a run goes through the scorer
(thinkrl.tasks.isolation), a hang or a crash scores 0 and is counted per step (reward/timeouts, reward/errors),
the worker is replaced, and the rollout's event loop keeps running while a reward hangs."""
from __future__ import annotations

import asyncio
import json

import pytest
import torch

import thinkrl.system.loop as loop_mod
from thinkrl.config import ConfigError, load_config
from thinkrl.rollout.workflow import SingleTurnWorkflow
from thinkrl.system.setup import build_run, make_workflow
from thinkrl.system.train import train_rl
from thinkrl.tasks import make_task
from thinkrl.tasks.arithmetic import Arithmetic
from thinkrl.tasks.base import FunctionTask
from thinkrl.tasks.isolation import Scorer, make_scorer, resolved_isolation
from thinkrl.types import Generation, Sample, SamplingParams

from hostile_rewards import Hostile, SlowOn, expected  # noqa: E402  (beside this file: light for the workers)

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
        "model.intermediate_size=64", "data.num_train=200", "data.num_eval=4", "rollout.n=4",
        "rollout.batch_prompts=4", "rollout.max_new_tokens=8", "eval.k=0", "log.progress=false", "algo.lr=0.01",
        "run.threads=1", "rollout.temperature=1.0"]


def test_a_run_whose_reward_hangs_and_crashes_writes_every_step_with_the_counts(tmp_path, monkeypatch):
    cfg = load_config(None, TINY + ["train.steps=2", "task.reward_timeout=0.5", f"run.output_dir={tmp_path}"])
    run = build_run(cfg)
    run.task = Hostile()
    seen: list[list] = []  # the trajectories each step trained on

    def spy(trajs):
        seen.append(list(trajs))
        return real(trajs)

    real = loop_mod.reward_fault_metrics
    monkeypatch.setattr(loop_mod, "reward_fault_metrics", spy)
    res = train_rl(cfg, run=run)
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert res["steps"] == 2 and [r["step"] for r in recs] == [1, 2] and len(seen) == 2
    kinds = {"timeout": 0, "error": 0}
    for rec, trajs in zip(recs, seen):
        exp = [expected(t.metrics["text"]) for t in trajs]
        assert [(t.reward, t.metrics["reward_status"]) for t in trajs] == exp
        assert rec["reward/timeouts"] == sum(s == "timeout" for _, s in exp)
        assert rec["reward/errors"] == sum(s == "error" for _, s in exp)
        for _, s in exp:
            kinds[s] = kinds.get(s, 0) + 1
    # the sampled texts did hit the faults (otherwise this run proves nothing)
    assert kinds["timeout"] >= 1 and kinds["error"] >= 1, kinds


# ----------------------------------------------------------------------------- off the event loop


class CountingEngine:
    """Answers at once with one token; records the order in which episodes finish."""

    async def generate(self, input_ids, params=None, n=1):
        await asyncio.sleep(0)
        return [Generation([5], [-0.1], [0], "stop") for _ in range(n)]


def _finish_order(task, scorer, tok, done_file) -> tuple[list[str], list]:
    """Seven episodes at once, the slow one first: the order in which they finish, and their trajectories. When
    the six others have finished, `done_file` is created (the slow reward waits for it)."""
    wf = SingleTurnWorkflow(task, tok, SamplingParams(max_new_tokens=1), 1, scorer=scorer)
    samples = [Sample("slow", "1+1", str(done_file))] + [Sample(f"fast{i}", "1+1") for i in range(6)]
    order: list[str] = []

    async def one(s):
        trajs = await wf.run_episode(CountingEngine(), s)
        order.append(s.id)
        if len([x for x in order if x != "slow"]) == 6:
            done_file.write_text("done")
        return trajs

    async def go():
        return await asyncio.gather(*[one(s) for s in samples])

    try:
        return order, asyncio.run(go())
    finally:
        wf.close()


def test_other_episodes_complete_while_a_reward_hangs(tok, tmp_path):
    # the slow reward returns only once the six other episodes have finished: they must finish while it runs
    # (if it blocked the event loop they could not, and it would run into its timeout first)
    order, res = _finish_order(SlowOn(), Scorer("process", timeout=60.0, num_workers=2), tok, tmp_path / "done")
    assert order[-1] == "slow" and len(order) == 7
    assert all(r[0].reward == 1.0 and r[0].metrics["reward_status"] == "ok" for r in res)


def test_the_check_can_fail_a_reward_on_the_event_loop_blocks_it(tok, tmp_path):
    # the same episodes with the reward inline (on the event loop): the others cannot finish while it waits, so it
    # runs into its timeout (scored 0) and finishes before them
    order, res = _finish_order(SlowOn(), Scorer("inline", timeout=1.0), tok, tmp_path / "done")
    assert order[-1] != "slow" and res[0][0].metrics["reward_status"] == "timeout"


# ----------------------------------------------------------------------------- the declared isolation


def my_reward(response: str, sample: Sample) -> float:
    return 1.0


class Overridden(Arithmetic):
    def reward(self, response: str, sample: Sample) -> float:
        return 1.0


class Redeclared(Arithmetic):
    reward_isolation = "inline"

    def reward(self, response: str, sample: Sample) -> float:
        return 1.0


def test_auto_isolation_is_the_tasks_declaration():
    assert resolved_isolation(FunctionTask(my_reward), "auto") == "process"  # a user reward
    assert resolved_isolation(make_task("arithmetic"), "auto") == "inline"
    assert resolved_isolation(make_task("countdown"), "auto") == "inline"
    assert resolved_isolation(make_task("math"), "auto") == "process"  # SymPy: one C call can run for minutes
    assert resolved_isolation(make_task("code"), "auto") == "thread"  # the sandbox is its own subprocess
    assert resolved_isolation(make_task("arithmetic"), "thread") == "thread"  # a configured mode wins
    assert resolved_isolation(Overridden(), "auto") == "process"  # a built-in's reward replaced by user code
    assert resolved_isolation(Redeclared(), "auto") == "inline"  # ... that declares its own
    with pytest.raises(ValueError, match="valid: auto, process, thread, inline"):
        resolved_isolation(make_task("arithmetic"), "gpu")


def test_config_declares_and_checks_the_reward_fields():
    cfg = load_config(None, ["task.reward_isolation=thread", "task.reward_workers=3", "task.reward_timeout=2"])
    sc = make_scorer(make_task("arithmetic"), cfg.task)
    assert (sc.mode, sc.pool.num_workers, sc.pool.timeout) == ("thread", 3, 2.0)
    sc.close()
    auto = load_config(None, ["task.reward_timeout=2"]).task
    assert (make_scorer(make_task("arithmetic"), auto).pool.timeout, make_scorer(FunctionTask(my_reward), auto).pool.timeout,
            make_scorer(make_task("arithmetic"), load_config(None, ["task.reward_isolation=inline"]).task).pool.timeout
            ) == (None, 2.0, 10.0)  # a declared-bounded built-in runs without the watchdog; a configured inline keeps it
    with pytest.raises(ConfigError, match="task.reward_isolation"):
        load_config(None, ["task.reward_isolation=sometimes"])
    with pytest.raises(ConfigError, match="task.reward_workers"):
        load_config(None, ["task.reward_workers=0"])


def test_the_runs_workflow_scores_through_the_configured_scorer(tmp_path):
    cfg = load_config(None, TINY + ["task.reward_isolation=thread", "task.reward_timeout=0.5"])
    run = build_run(cfg)
    wf = make_workflow(cfg, run)
    try:
        assert wf.scorer.mode == "thread" and wf.scorer.pool.timeout == 0.5
        assert wf.with_sampling(wf.params, 1).scorer is wf.scorer  # eval/filter copies share it
    finally:
        wf.close()
    assert torch.get_num_threads() == 1
