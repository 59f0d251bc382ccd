"""`thinkrl bench NAME [--json]`: the home of benchmarks.

A benchmark is a function `(args: list[str]) -> dict` registered with `@register_bench(name)`.
It prints a human-readable report as it goes; with --json the CLI prints the returned dict as
one JSON object on the last line of stdout.
"""
from __future__ import annotations

import importlib
from typing import Callable

BENCHES: dict[str, Callable] = {}
_MODULES = ["smoke", "generate", "train", "rl_step", "async_", "serve"]


def register_bench(name: str, help: str = ""):
    def deco(fn):
        fn.help = help
        BENCHES[name] = fn
        return fn

    return deco


def registered_benches() -> dict[str, Callable]:
    for m in _MODULES:
        try:
            importlib.import_module(f"thinkrl.bench.{m}")
        except ModuleNotFoundError as e:
            if e.name != f"thinkrl.bench.{m}":
                raise
    return BENCHES
