"""Supervised fine-tuning on demonstrations: loss on assistant tokens only (the chat template's mask)."""
from __future__ import annotations

import random
import time
from typing import Callable

from thinkrl.data.chat import encode_example
from thinkrl.train.engine import stop_on_bad_steps
from thinkrl.types import Sample


def demonstrations(task, samples: list[Sample], seed: int = 0) -> list[list[dict]]:
    """The task's prompt + its demonstration as the assistant turn, per sample (the teacher's conversations)."""
    rng = random.Random(seed)
    return [task.build_prompt(s) + [{"role": "assistant", "content": task.demonstration(s, rng)}] for s in samples]


def build_sft_examples(tokenizer, task, samples: list[Sample], seed: int = 0) -> list[tuple[list[int], list[bool]]]:
    """(token ids, assistant mask) per sample, the assistant turn being the task's demonstration."""
    return [encode_example(tokenizer, msgs) for msgs in demonstrations(task, samples, seed)]


def build_file_examples(tokenizer, conversations: list[tuple[str, list[dict]]], max_positions: int = 0,
                        max_tokens_per_mb: int = 0) -> list[tuple[list[int], list[bool]]]:
    """(token ids, assistant mask) per (where, messages) of a chat-format file (thinkrl.data.files). A conversation
    with no assistant token after the template, or longer than the model's positions or the micro-batch budget,
    is a ValueError naming its row."""
    out = []
    for where, msgs in conversations:
        ids, mask = encode_example(tokenizer, msgs)
        if not any(mask):
            raise ValueError(f"{where}: no assistant tokens after the chat template (nothing to train on)")
        if max_positions and len(ids) > max_positions:
            raise ValueError(f"{where}: {len(ids)} tokens, more than the model's {max_positions} positions")
        if max_tokens_per_mb and len(ids) > max_tokens_per_mb:
            raise ValueError(f"{where}: {len(ids)} tokens, more than train.max_tokens_per_mb={max_tokens_per_mb}")
        out.append((ids, mask))
    return out


class BatchOrder:
    """Batch `step` of SFT as a pure function of (seed, step), so a resumed run sees the same batches.

    The batches cut one stream into `batch_size` pieces: the concatenation of successive shuffles of
    range(n) drawn from random.Random(seed). Epochs are regenerated from the seed when a step needs them."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._rng, self._next, self._perms = random.Random(seed), 0, {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch < self._next and epoch not in self._perms:  # an epoch already dropped: replay from the seed
            self._rng, self._next, self._perms = random.Random(self.seed), 0, {}
        while self._next <= epoch:
            perm = list(range(self.n))
            self._rng.shuffle(perm)
            self._perms[self._next] = perm
            self._next += 1
        return self._perms[epoch]

    def batch(self, step: int) -> list[int]:
        """Example indices of 0-based step `step`."""
        lo, hi = step * self.batch_size, (step + 1) * self.batch_size
        for e in [e for e in self._perms if e < lo // self.n]:  # epochs no later step needs
            del self._perms[e]
        return [self._perm(p // self.n)[p % self.n] for p in range(lo, hi)]


def run_sft(engine, examples, steps: int, batch_size: int, seed: int = 0, start_step: int = 0,
            time_budget: float | None = None, on_step: Callable[[int, dict], None] | None = None,
            max_bad_steps: int = 0) -> int:
    """Train from step `start_step` up to step `steps` (or until `time_budget` seconds pass). Step s trains on
    `BatchOrder(len(examples), batch_size, seed).batch(s)`. Returns the number of steps done. `max_bad_steps` (> 0)
    NaN/Inf steps in a row raise NumericalFault after that step's `on_step` (train.max_bad_steps)."""
    order = BatchOrder(len(examples), batch_size, seed)
    t0 = time.perf_counter()
    step = start_step
    while step < steps:
        m = engine.sft_step([examples[i] for i in order.batch(step)])
        step += 1
        if on_step:
            on_step(step, m)
        stop_on_bad_steps(m, max_bad_steps, step)
        if time_budget is not None and time.perf_counter() - t0 >= time_budget:
            break
    return step - start_step
