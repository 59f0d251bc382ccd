"""The inference-engine interface every engine implements (embedded, remote SGLang/vLLM)."""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from thinkrl.types import Generation, SamplingParams


@runtime_checkable
class InferenceEngine(Protocol):
    version: int  # policy version of the weights currently loaded

    async def generate(self, input_ids: list[int], params: SamplingParams, n: int = 1) -> list[Generation]:
        """Sample n continuations of one prompt. Many calls may be in flight at once (asyncio)."""
        ...

    def pause(self) -> None:
        """Stop generating at the next token boundary; in-flight requests wait (or abort, per engine mode)."""
        ...

    def update_weights(self, src: Any, version: int) -> None:
        """Load new weights (a state dict, a model, or a path, per engine) and tag later tokens with `version`."""
        ...

    def resume(self) -> None:
        """Continue in-flight sequences with the current weights."""
        ...


ENGINES: dict[str, type] = {}


def register_engine(name: str):
    def deco(cls):
        ENGINES[name] = cls
        return cls

    return deco


def generate_all(engine, prompts: list[list[int]], params: SamplingParams, n: int = 1) -> list[list[Generation]]:
    """n samples for each prompt, blocking: the engine's `generate_batch` when it has one, else its async API."""
    if hasattr(engine, "generate_batch"):
        return engine.generate_batch(prompts, params, n)
    import asyncio

    async def go():
        return await asyncio.gather(*[engine.generate(p, params, n) for p in prompts])

    return asyncio.run(go())
