"""Workflows: a task-specific episode (prompt -> generate -> reward) producing Trajectories."""
from __future__ import annotations

import asyncio
from typing import Protocol

from thinkrl.data.chat import encode_prompt
from thinkrl.types import Sample, SamplingParams, Trajectory


class Workflow(Protocol):
    async def run_episode(self, engine, sample: Sample) -> list[Trajectory] | None: ...


class SingleTurnWorkflow:
    """One prompt, n sampled answers, each scored by the task's reward."""

    def __init__(self, task, tokenizer, params: SamplingParams, n: int, scorer=None):
        self.task, self.tokenizer, self.params, self.n = task, tokenizer, params, n
        self.scorer = scorer  # optional isolation pool: scorer(task, [(text, sample), ...]) -> rewards
        self._prompt_cache: dict[str, list[int]] = {}

    def prompt_ids(self, sample: Sample) -> list[int]:
        ids = self._prompt_cache.get(sample.id)
        if ids is None:
            ids = encode_prompt(self.tokenizer, self.task.build_prompt(sample))
            self._prompt_cache[sample.id] = ids
        return ids

    async def run_episode(self, engine, sample: Sample, group_id: str | None = None) -> list[Trajectory]:
        ids = self.prompt_ids(sample)
        gens = await engine.generate(ids, self.params, self.n)
        texts = [self.tokenizer.decode(g.tokens, skip_special_tokens=True) for g in gens]
        if self.scorer is not None:
            rewards = await self.scorer(self.task, [(t, sample) for t in texts])
        else:
            rewards = [float(self.task.reward(t, sample)) for t in texts]
        gid = group_id or sample.id
        P = len(ids)
        return [
            Trajectory(
                sample_id=sample.id, group_id=gid, tokens=ids + g.tokens,
                loss_mask=[False] * P + [True] * len(g.tokens), logprobs=[0.0] * P + list(g.logprobs),
                versions=[-1] * P + list(g.versions), reward=r, finish=g.finish, prompt_len=P,
                metrics={"text": t},
            )
            for g, t, r in zip(gens, texts, rewards)
        ]


def collect(engine, workflow, samples: list[Sample], group_prefix: str = "") -> list[Trajectory]:
    """Run one episode per sample concurrently against the engine; returns all trajectories."""

    async def go():
        res = await asyncio.gather(*[workflow.run_episode(engine, s, f"{group_prefix}{s.id}") for s in samples])
        return [t for r in res if r for t in r]

    return asyncio.run(go())
