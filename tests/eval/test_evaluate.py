"""Evaluation runs the task's workflow (tools included) and counts correct at algo.correct_threshold.

Scripted engines answer by reading the decoded context, so every expected number is hand-computable:
the tool engine gets an answer right only after a tool result is in its context, which a tool-less
evaluation never provides.
"""
from __future__ import annotations

import asyncio
import re

import pytest
import torch

from thinkrl.config import load_config
from thinkrl.eval.evaluate import EVAL_SEED, evaluate
from thinkrl.eval.metrics import pass_at_k
from thinkrl.rollout.workflow import SingleTurnWorkflow
from thinkrl.system.setup import Run
from thinkrl.system.train import run_eval
from thinkrl.tasks import make_task
from thinkrl.tasks.base import Task
from thinkrl.types import Generation, Sample, SamplingParams


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


class Engine:
    """Answers `answer(context, j)` for the j-th of n samples; records every call, and per n the most calls
    in flight at once."""

    def __init__(self, tok, answer):
        self.tok, self.answer = tok, answer
        self.calls, self.inflight, self.max_inflight = [], 0, {}

    async def generate(self, input_ids, params, n=1):
        self.inflight += 1
        self.max_inflight[n] = max(self.max_inflight.get(n, 0), self.inflight)
        await asyncio.sleep(0)  # let the other episodes of the batch start
        self.inflight -= 1
        context = self.tok.decode(input_ids, skip_special_tokens=False)
        self.calls.append({"params": params, "n": n})
        out = []
        for j in range(n):
            toks = ids(self.tok, self.answer(context, j))
            out.append(Generation(toks, [-1.0] * len(toks), [0] * len(toks), "stop"))
        return out


def calculator_answer(context, j):
    """Calls the calculator on the question, then boxes the tool's result: right only with tools."""
    m = re.search(r"<result>([^<]*)</result>$", context)
    if m:
        return f" \\boxed{{{m.group(1)}}}<|end|>"
    question = re.findall(r"What is (.+?)\?", context)[-1]
    return f"<calc>{question}</calc>"


def make_run(cfg, tok, task, samples):
    return Run(cfg, torch.device("cpu"), None, tok, task, [], samples)


def test_tool_task_is_evaluated_with_its_tools(tok):
    cfg = load_config(None, ["task.name=calculator", "eval.k=2", "eval.temperature=0.7", "rollout.max_new_tokens=64"])
    task = make_task("calculator", {"ops": "+*", "max_value": 30})
    samples = task.generate(5, seed=0)
    engine = Engine(tok, calculator_answer)
    res = run_eval(cfg, engine, make_run(cfg, tok, task, samples))
    assert {k: res[k] for k in ("pass@1", "reward/greedy", "num_problems", "k", "pass@1/sampled", "avg@2", "pass@2",
                                "maj@2")} == {"pass@1": 1.0, "reward/greedy": 1.0, "num_problems": 5, "k": 2,
                                              "pass@1/sampled": 1.0, "avg@2": 1.0, "pass@2": 1.0, "maj@2": 1.0}
    assert all("</calc>" in c["params"].stop for c in engine.calls)  # generation stops at the tool call
    greedy = [c for c in engine.calls if c["params"].temperature == 0.0]
    sampled = [c for c in engine.calls if c["params"].temperature == 0.7]
    assert len(greedy) == 2 * 5 and {c["n"] for c in greedy} == {1}  # a tool turn and an answer turn each
    assert [c["n"] for c in sampled].count(2) == 5 and len(sampled) == 5 + 2 * 5  # k branches share turn one
    assert len(greedy) + len(sampled) == len(engine.calls) and all(c["params"].seed is not None for c in sampled)
    assert {c["params"].seed for c in sampled if c["n"] == 2} == {EVAL_SEED}
    # the same engine without the tool loop never sees a result: every answer is wrong
    plain = SingleTurnWorkflow(task, tok, SamplingParams(max_new_tokens=64), cfg.rollout.n)
    out = evaluate(Engine(tok, calculator_answer), plain, samples, 64, correct_threshold=1.0)
    assert out["pass@1"] == 0.0


class GradedTask(Task):
    """Reward 1.0 for 'full', 0.5 for 'half', else 0.0."""

    name = "graded"
    reward_isolation = "inline"  # a dict lookup: cannot hang

    def reward(self, response, sample):
        return {"full": 1.0, "half": 0.5}.get(response.strip(), 0.0)


@pytest.mark.parametrize("threshold, acc", [(0.5, 1.0), (1.0, 0.5), (0.4, 1.0), (1.1, 0.0)])
def test_correct_threshold_is_honoured(tok, threshold, acc):
    cfg = load_config(None, [f"algo.correct_threshold={threshold}", "eval.k=0"])
    samples = [Sample(id="a", prompt="full"), Sample(id="b", prompt="half")]
    engine = Engine(tok, lambda ctx, j: "full" if "full" in ctx else "half")
    res = run_eval(cfg, engine, make_run(cfg, tok, GradedTask(), samples))
    assert res["pass@1"] == acc and res["reward/greedy"] == 0.75


def test_sampled_mean_and_pass_at_k_in_batches(tok):
    # prompt i gets sample j right when j >= 4 - i: 0, 1, 2, 3 right out of k=4 for i = 0..3
    samples = [Sample(id=str(i), prompt=f"q{i}") for i in range(4)]
    engine = Engine(tok, lambda ctx, j: "full" if j >= 4 - int(re.findall(r"q(\d)", ctx)[-1]) else "half")
    wf = SingleTurnWorkflow(GradedTask(), tok, SamplingParams(max_new_tokens=8, stop_token_ids=[tok.eos_token_id]), 8)
    res = evaluate(engine, wf, samples, 16, correct_threshold=1.0, k=4, batch_size=8)
    assert res["pass@1"] == 0.0 and res["reward/greedy"] == 0.5  # greedy is sample j=0: always 'half'
    assert res["avg@4"] == res["pass@1/sampled"] == pytest.approx((0 + 1 + 2 + 3) / 16)
    assert res["pass@4"] == pytest.approx(3 / 4) == sum(pass_at_k(4, c, 4) for c in range(4)) / 4
    assert engine.max_inflight == {1: 4, 4: 2}  # batch_size 8: all 4 greedy prompts, then 2 prompts of k=4 at a time
    p = engine.calls[-1]["params"]
    assert (p.max_new_tokens, p.seed, p.stop_token_ids, engine.calls[-1]["n"]) == (16, EVAL_SEED, [tok.eos_token_id], 4)
