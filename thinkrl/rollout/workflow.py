"""Workflows: a task-specific episode (prompt -> generate -> reward) producing Trajectories.

Training, evaluation and the pass-rate filter all run episodes through the task's workflow, so a tool task
is sampled with its tools everywhere. A workflow samples with the params and n it was built with;
`with_sampling(params, n)` gives a copy that samples differently (greedy n=1, or k seeded samples):

    greedy = workflow.with_sampling(SamplingParams(max_new_tokens=64, temperature=0.0), 1)
    [traj] = await greedy.run_episode(engine, sample)
"""
from __future__ import annotations

import asyncio
import copy
from typing import Protocol

from thinkrl.data.chat import encode_prompt
from thinkrl.tasks.isolation import Scorer
from thinkrl.types import Sample, SamplingParams, Trajectory


class Workflow(Protocol):
    params: SamplingParams
    n: int

    async def run_episode(self, engine, sample: Sample, group_id: str | None = None) -> list[Trajectory] | None: ...

    def with_sampling(self, params: SamplingParams, n: int) -> "Workflow": ...


class SingleTurnWorkflow:
    """One prompt, n sampled answers, each scored by the task's reward."""

    def __init__(self, task, tokenizer, params: SamplingParams, n: int, scorer: Scorer | None = None):
        self.task, self.tokenizer = task, tokenizer
        # every reward goes through the scorer (thinkrl.tasks.isolation): a run's is make_scorer(task, cfg.task)
        # (isolation, timeout); without one, rewards run inline with no time limit, a failure still scoring 0
        self.scorer = scorer if scorer is not None else Scorer("inline", None)
        self._prompt_cache: dict[str, list[int]] = {}
        self._set_sampling(params, n)

    def _set_sampling(self, params: SamplingParams, n: int) -> None:
        if n < 1:
            raise ValueError(f"{type(self).__name__}: n must be >= 1, got {n}")
        self.params, self.n = params, n

    def with_sampling(self, params: SamplingParams, n: int):
        """A copy of this workflow that samples `n` episodes per prompt with `params`. The copy shares the
        task, tokenizer, scorer, tools and prompt cache (prompt ids do not depend on sampling)."""
        wf = copy.copy(self)
        wf._set_sampling(params, n)
        return wf

    def prompt_ids(self, sample: Sample) -> list[int]:
        ids = self._prompt_cache.get(sample.id)
        if ids is None:
            ids = encode_prompt(self.tokenizer, self.task.build_prompt(sample))
            self._prompt_cache[sample.id] = ids
        return ids

    async def score(self, texts: list[str], sample: Sample) -> list[tuple[float, str]]:
        """(reward, status) of each response text, status "ok" | "error" | "timeout" (a failure scores 0)."""
        return await self.scorer(self.task, [(t, sample) for t in texts])

    def close(self) -> None:
        """Stop the scorer's workers (copies from `with_sampling` share them)."""
        self.scorer.close()

    async def run_episode(self, engine, sample: Sample, group_id: str | None = None) -> list[Trajectory]:
        ids = self.prompt_ids(sample)
        gens = await engine.generate(ids, self.params, self.n)
        texts = [self.tokenizer.decode(g.tokens, skip_special_tokens=True) for g in gens]
        scored = await self.score(texts, sample)
        gid = group_id or sample.id
        P = len(ids)
        return [
            Trajectory(
                sample_id=sample.id, group_id=gid, tokens=ids + g.tokens,
                loss_mask=[False] * P + [True] * len(g.tokens), logprobs=[0.0] * P + list(g.logprobs),
                versions=[-1] * P + list(g.versions), reward=r, finish=g.finish, prompt_len=P,
                metrics={"text": t, "reward_status": status},
            )
            for g, t, (r, status) in zip(gens, texts, scored)
        ]


def collect(engine, workflow, samples: list[Sample], group_prefix: str = "") -> list[Trajectory]:
    """Run one episode per sample concurrently against the engine; returns all trajectories."""

    async def go():
        res = await asyncio.gather(*[workflow.run_episode(engine, s, f"{group_prefix}{s.id}") for s in samples])
        return [t for r in res if r for t in r]

    return asyncio.run(go())


def run_batched(engine, workflow, samples: list[Sample], batch_size: int, progress=None) -> list[list[Trajectory]]:
    """One episode per sample, `batch_size` episodes in flight at a time (asyncio.gather within a batch);
    returns each sample's trajectories in sample order ([] where the workflow dropped the episode).
    `progress(done, total)` is called after each batch."""
    if batch_size < 1:
        raise ValueError(f"run_batched: batch_size must be >= 1, got {batch_size}")

    async def go():
        out: list[list[Trajectory]] = []
        for i in range(0, len(samples), batch_size):
            chunk = samples[i : i + batch_size]
            res = await asyncio.gather(*[workflow.run_episode(engine, s, s.id) for s in chunk])
            out += [list(r or []) for r in res]
            if progress:
                progress(len(out), len(samples))
        return out

    return asyncio.run(go())
