"""What a task is: a prompt builder + a reward (+ optionally a generator of samples).

Users plug in their own with `task.name=my_pkg.my_mod:MyTask` (a Task subclass) or
`task.name=my_pkg.my_mod:my_reward` (a function `(response: str, sample: Sample) -> float`).
"""
from __future__ import annotations

import importlib
import inspect
from typing import Callable

from thinkrl.types import Sample

TASKS: dict[str, type] = {}


def register_task(name: str):
    def deco(cls):
        if name in TASKS:
            raise ValueError(f"task {name!r} registered twice")
        cls.name = name
        TASKS[name] = cls
        return cls

    return deco


class Task:
    """Base class. Subclasses override `reward`, and usually `build_prompt` and `generate`."""

    name: str = "task"
    system_prompt: str = ""
    # where task.reward_isolation=auto runs the reward (thinkrl.tasks.isolation): "process" (worker processes, a
    # hang or crash is killed and the worker replaced) for any reward not known to be bounded; a built-in declares
    # "inline" (on the rollout's event loop) only when its reward cannot hang: bounded parsing, no user code
    reward_isolation: str = "process"

    def __init__(self, system_prompt: str = "", **params):
        if params:
            bad = ", ".join(sorted(params))
            raise ValueError(f"task {self.name!r}: unknown parameter(s) {bad}")
        self.system_prompt = system_prompt or self.system_prompt

    # -- prompts
    def build_prompt(self, sample: Sample) -> list[dict]:
        """Chat messages for a sample (a raw string prompt becomes one user message)."""
        msgs = [dict(m) for m in sample.prompt] if isinstance(sample.prompt, list) else [{"role": "user", "content": str(sample.prompt)}]
        if self.system_prompt and not any(m.get("role") == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": self.system_prompt})
        return msgs

    # -- reward
    def reward(self, response: str, sample: Sample) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def extract_answer(self, response: str) -> str | None:
        """The final answer in a response, what maj@k votes over (None: the response gives none). Tasks that
        grade an extracted answer override this; the default is the response with its whitespace normalised."""
        return " ".join(response.split())

    # -- optional: generated data
    def generate(self, n: int, seed: int) -> list[Sample]:
        raise NotImplementedError(f"task {self.name!r} has no generator; set data.train_path")

    def demonstration(self, sample: Sample, rng) -> str:
        """An SFT target for the sample (a teacher's answer). Optional."""
        raise NotImplementedError(f"task {self.name!r} has no demonstrations for SFT")

    @property
    def can_generate(self) -> bool:
        return type(self).generate is not Task.generate


class FunctionTask(Task):
    """Wraps a plain reward function `(response, sample) -> float`."""

    def __init__(self, fn: Callable, system_prompt: str = "", **params):
        super().__init__(system_prompt=system_prompt, **params)
        self.fn = fn
        self.name = getattr(fn, "__name__", "custom")

    def reward(self, response: str, sample: Sample) -> float:
        return float(self.fn(response, sample))


def load_task_class(name: str):
    if ":" in name:
        mod_name, attr = name.split(":", 1)
        try:
            obj = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"task.name={name!r}: cannot import ({e})") from None
        return obj
    from thinkrl.tasks import registered_tasks

    valid = registered_tasks()
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid: {', '.join(valid)}")
    return TASKS[name]


def make_task(name: str, params: dict | None = None, system_prompt: str = "") -> Task:
    obj = load_task_class(name)
    params = dict(params or {})
    if inspect.isclass(obj) and issubclass(obj, Task):
        try:
            return obj(system_prompt=system_prompt, **params)
        except TypeError as e:
            raise ValueError(f"task {name!r}: bad parameters ({e})") from None
    if callable(obj):
        return FunctionTask(obj, system_prompt=system_prompt, **params)
    raise ValueError(f"task.name={name!r} is neither a Task subclass nor a reward function")
