"""Reward functions that misbehave, in a module that imports little: a reward worker process unpickles them
(importing this module) each time it is started or replaced."""
from __future__ import annotations

import os
import time
import zlib

from thinkrl.tasks.arithmetic import Arithmetic
from thinkrl.tasks.base import Task
from thinkrl.types import Sample


def fault_of(response: str) -> str:
    """What `Hostile` does with a response: a pure function of its text. Half the texts hit a fault (a C-level hang,
    which costs a kill, on 1/16 only), so a short run meets every kind whatever the sampled texts."""
    kinds = ["sleep", "spin", "spin", "spin", "crash", "crash", "raise", "raise"]
    h = zlib.crc32(response.encode()) % 16
    return kinds[h] if h < len(kinds) else "ok"


def expected(response: str) -> tuple[float, str]:
    """(reward, status) the scorer must give `Hostile` for a response."""
    kind = fault_of(response)
    if kind == "ok":
        return float(len(response) % 3) / 2, "ok"
    return 0.0, "timeout" if kind in ("sleep", "spin") else "error"


class Hostile(Arithmetic):
    """Arithmetic prompts; a reward that hangs in C (sleep), hangs in Python (spin), kills its process or raises,
    depending on the response. A user task: its rewards run in worker processes."""

    reward_isolation = "process"

    def reward(self, response: str, sample: Sample) -> float:
        kind = fault_of(response)
        if kind == "sleep":
            time.sleep(120)
        elif kind == "spin":
            while True:
                pass
        elif kind == "crash":
            os._exit(7)
        elif kind == "raise":
            raise RuntimeError("broken reward")
        return float(len(response) % 3) / 2


class SlowOn(Task):
    """Reward 1; the sample "slow" waits until the file named by its answer exists (the other episodes are done)."""

    reward_isolation = "process"

    def reward(self, response: str, sample: Sample) -> float:
        while sample.id == "slow" and not os.path.exists(sample.answer):
            time.sleep(0.02)
        return 1.0
