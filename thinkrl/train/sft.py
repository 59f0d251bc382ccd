"""Supervised fine-tuning on demonstrations: loss on assistant tokens only (the chat template's mask)."""
from __future__ import annotations

import random
import time
from typing import Callable

from thinkrl.data.chat import encode_example
from thinkrl.types import Sample


def build_sft_examples(tokenizer, task, samples: list[Sample], seed: int = 0) -> list[tuple[list[int], list[bool]]]:
    """(token ids, assistant mask) per sample, the assistant turn being the task's demonstration."""
    rng = random.Random(seed)
    out = []
    for s in samples:
        msgs = task.build_prompt(s) + [{"role": "assistant", "content": task.demonstration(s, rng)}]
        out.append(encode_example(tokenizer, msgs))
    return out


def run_sft(engine, examples, steps: int, batch_size: int, seed: int = 0, start_step: int = 0,
            time_budget: float | None = None, on_step: Callable[[int, dict], None] | None = None) -> int:
    """Train `steps` SFT steps (or until `time_budget` seconds pass). Returns the number of steps done."""
    rng = random.Random(seed)
    order: list[int] = []
    t0 = time.perf_counter()
    step = start_step
    while step < steps:
        if len(order) < batch_size:
            perm = list(range(len(examples)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[:batch_size], order[batch_size:]
        m = engine.sft_step([examples[i] for i in idx])
        step += 1
        if on_step:
            on_step(step, m)
        if time_budget is not None and time.perf_counter() - t0 >= time_budget:
            break
    return step - start_step
