"""The inference-engine contract. Every engine (embedded, hf, remote, an engine process, Ray actors) subclasses
InferenceEngine, declares what it can do in `caps`, and is built by name through the registry:

    engine = engine_class(cfg.rollout.engine).from_config(cfg, model, tokenizer, version=0)
    gens = await engine.generate(prompt_ids, params, n=8)     # asyncio; many calls may be in flight
    groups = engine.generate_batch(prompts, params, n=8)      # blocking, from any thread
    engine.load_weights(state_dict, version=3)                # pause(mode) -> update_weights -> resume()
    lps = engine.score([prompt + response])                   # caps.score: teacher-forced log-probs, lps[0][0] = 0

Callers decide from `caps`, never from an engine's type or attributes. An engine implements `generate`,
`pause`, `update_weights` and `resume` (and `score`, declaring caps.score); batching, the blocking API and the
weight load are written here once.
"""
from __future__ import annotations

import abc
import asyncio
import importlib
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, ClassVar

from thinkrl.types import Generation, SamplingParams

# What happens to in-flight requests while the weights are loaded (`pause(mode)`); `rollout.pause_mode`.
PAUSE_MODES = {
    "in_place": "in-flight sequences stop at a token boundary and keep their KV cache; after the load they "
                "continue with the new weights (the KV of their earlier tokens stays the old weights'), and "
                "every token carries the version that produced it",
    "retract": "like in_place, but the in-flight sequences' KV cache is dropped and recomputed with the new "
               "weights when they continue",
    "abort": "in-flight requests end at once with their partial output (finish='abort'); the remote engine "
             "resumes each such sample itself (prompt + tokens so far), so its callers still get whole samples",
}

# Where update_weights(src, version) can take the weights from (`caps.transports`, `rollout.weight_sync`).
TRANSPORT_NAMES = ("memory", "disk", "pipe", "shm", "dist", "object_store")


@dataclass(frozen=True)
class EngineCaps:
    """What an engine can do, declared by its class."""

    in_process: bool  # generates in this process, with tensors of this process
    pause_modes: tuple[str, ...]  # the modes pause() takes (PAUSE_MODES); the first is the engine's default
    transports: tuple[str, ...]  # what update_weights loads from (TRANSPORT_NAMES); the first is the default
    shares_trainer_weights: bool = False  # generates with the trainer's own module: a load copies nothing, and
    # generation cannot overlap training (the trainer changes the weights under it)
    mid_sequence_update: bool = False  # a load may land between two tokens of an in-flight sequence, which
    # continues with the new weights; its tokens are tagged with the version that produced each
    score: bool = False  # has score(): the log-prob of every token of given sequences on the current weights

    def __post_init__(self):
        if not self.pause_modes or any(m not in PAUSE_MODES for m in self.pause_modes):
            raise ValueError(f"EngineCaps.pause_modes: need names from {', '.join(PAUSE_MODES)}, got {self.pause_modes}")
        if not self.transports or any(t not in TRANSPORT_NAMES for t in self.transports):
            raise ValueError(f"EngineCaps.transports: need names from {', '.join(TRANSPORT_NAMES)}, got {self.transports}")


GenerateCall = tuple[list[int], "SamplingParams | None", int]  # (input_ids, params, n): one generate call


@dataclass
class StreamEvent:
    """Tokens of one of the n samples of a streamed generate call, as they are sampled (generate_stream)."""

    index: int  # which of the n samples
    tokens: list[int]  # new since this sample's previous event
    logprobs: list[float]
    top_logprobs: list | None = None  # per new token, its top-N (SamplingParams.top_logprobs), else None
    done: Generation | None = None  # on the sample's last event: the whole Generation (the truth for its tokens)


class InferenceEngine(abc.ABC):
    caps: ClassVar[EngineCaps]
    name: ClassVar[str] = ""  # the registry name (register_engine)
    version: int  # policy version of the weights loaded now; tokens generated next carry it
    pause_mode: str  # the mode load_weights pauses with (one of caps.pause_modes)
    transport: str  # how update_weights moves a state dict in (one of caps.transports)

    def __init__(self, version: int = 0, pause_mode: str = "auto", transport: str | None = None):
        self.version = version
        self.pause_mode = self.resolve_pause_mode(pause_mode)
        self.transport = self.caps.transports[0] if transport is None else transport
        if self.transport not in self.caps.transports:
            raise ValueError(f"{type(self).__name__}: transport must be one of {', '.join(self.caps.transports)}, "
                             f"got {self.transport!r}")

    # ------------------------------------------------------------------ what an engine implements
    @classmethod
    @abc.abstractmethod
    def from_config(cls, cfg, model, tokenizer, version: int = 0) -> InferenceEngine:
        """The engine for a thinkrl.config.Config, serving `model` (which some engines copy, or ignore)."""

    @abc.abstractmethod
    async def generate(self, input_ids: list[int], params: SamplingParams | None = None,
                       n: int = 1) -> list[Generation]:
        """n continuations of one prompt. Many calls may be in flight at once (asyncio)."""

    @abc.abstractmethod
    def pause(self, mode: str | None = None) -> None:
        """Stop generating at the next token boundary; in-flight requests are treated per `mode` (PAUSE_MODES;
        None: self.pause_mode). Returns once the engine is paused."""

    @abc.abstractmethod
    def update_weights(self, src: Any, version: int) -> None:
        """Load new weights from `src` (a state dict or nn.Module, a safetensors path, per caps.transports);
        tokens generated after this carry `version`. Called between pause() and resume(): use load_weights."""

    @abc.abstractmethod
    def resume(self) -> None:
        """Continue generating (in-flight sequences with the weights loaded now)."""

    def score(self, sequences: list[list[int]]) -> list[list[float]]:
        """Blocking, for engines with caps.score: per sequence, its log-probs on the weights loaded now,
        aligned with its tokens: [0.0, log p(s[1] | s[:1]), ..., log p(s[-1] | s[:-1])] (log_softmax of the raw
        logits, temperature 1). Never races a weight load. ValueError on an empty sequence or a bad token id."""
        raise NotImplementedError(f"the {self.name or type(self).__name__} engine cannot score sequences "
                                  "(caps.score is false)")

    # ------------------------------------------------------------------ written once, for every engine
    async def generate_many(self, requests: list[GenerateCall]) -> list[list[Generation]]:
        """Several generate calls at once; engines that can submit them together (one scheduling decision,
        so the batches do not depend on timing) override this."""
        return list(await asyncio.gather(*[self.generate(ids, params, n) for ids, params, n in requests]))

    async def generate_stream(self, input_ids: list[int], params: SamplingParams | None = None, n: int = 1):
        """generate(), as an async iterator of StreamEvents; this default yields each sample once, when all are
        done (the embedded engine streams every token as it is sampled)."""
        for i, g in enumerate(await self.generate(input_ids, params, n)):
            yield StreamEvent(i, list(g.tokens), list(g.logprobs), g.top_logprobs, done=g)

    def generate_batch(self, prompts: list[list[int]], params: SamplingParams | None = None,
                       n: int = 1) -> list[list[Generation]]:
        """Blocking: n samples for each prompt, submitted together. Works whether or not the calling thread
        runs an event loop."""
        return run_sync(lambda: self.generate_many([(p, params, n) for p in prompts]))

    def load_weights(self, src: Any, version: int, mode: str | None = None) -> None:
        """pause(mode) -> update_weights(src, version) -> resume(): the one way weights enter an engine."""
        self.pause(mode)
        try:
            self.update_weights(src, version)
        finally:
            self.resume()

    def stats(self) -> dict:
        return {"version": self.version}

    def close(self) -> None:
        """Release the engine's threads, processes or connections (in-flight requests are aborted)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @classmethod
    def resolve_pause_mode(cls, mode: str | None) -> str:
        """`mode` checked against caps.pause_modes; "auto" is the engine's default (the first)."""
        if mode in (None, "auto"):
            return cls.caps.pause_modes[0]
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause_mode: unknown value {mode!r}; valid: auto, {', '.join(PAUSE_MODES)}")
        if mode not in cls.caps.pause_modes:
            raise ValueError(f"pause_mode: {mode!r} is not supported by the {cls.name or cls.__name__} engine "
                             f"(it supports {', '.join(cls.caps.pause_modes)})")
        return mode


# ============================================================================ registry
ENGINES: dict[str, type[InferenceEngine]] = {}
PLACEMENTS: set[str] = set()  # registered engines that run another engine elsewhere (not rollout.engine choices)
# modules whose engines rollout.engine can name: imported before the registry is read, so the choices never
# depend on what happens to be imported
BUILTIN = ("thinkrl.rollout.engine", "thinkrl.rollout.hf", "thinkrl.rollout.remote", "thinkrl.rollout.process")


def register_engine(name: str, *, placement: bool = False):
    """Class decorator: registers an InferenceEngine under `name`. `placement=True`: the engine runs another
    engine somewhere else (an engine process, Ray actors); it is chosen by rollout.placement or
    cluster.backend, not named by rollout.engine."""

    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, InferenceEngine)):
            raise TypeError(f"register_engine({name!r}): {cls!r} is not an InferenceEngine subclass")
        if name in ENGINES and ENGINES[name] is not cls:
            raise ValueError(f"register_engine: {name!r} is already registered ({ENGINES[name].__name__})")
        cls.name = name
        ENGINES[name] = cls
        if placement:
            PLACEMENTS.add(name)
        return cls

    return deco


def _load_builtin() -> None:
    for mod in BUILTIN:
        importlib.import_module(mod)


def engine_names() -> list[str]:
    """The values rollout.engine accepts."""
    _load_builtin()
    return sorted(n for n in ENGINES if n not in PLACEMENTS)


def engine_class(name: str) -> type[InferenceEngine]:
    _load_builtin()
    if name not in ENGINES:
        raise ValueError(f"rollout.engine: unknown value {name!r}; valid: {', '.join(engine_names())}")
    return ENGINES[name]


def check_sequences(sequences, vocab: int, max_len: int) -> list[list[int]]:
    """score()'s input as lists of ints, each 1..max_len ids in [0, vocab); else a ValueError naming the first bad one."""
    out = []
    for i, s in enumerate(sequences):
        s = [int(t) for t in s]
        if not 1 <= len(s) <= max_len:
            raise ValueError(f"score: sequence {i} has {len(s)} tokens; need 1 to {max_len}")
        bad = next((t for t in s if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"score: sequence {i}: token id {bad} out of range [0, {vocab})")
        out.append(s)
    return out


def pause_mode_choices(engine: str) -> list[str]:
    """The rollout.pause_mode values engine `engine` supports ("auto" and its caps.pause_modes)."""
    return ["auto", *engine_class(engine).caps.pause_modes]


# ============================================================================ sync over async
def run_sync(make_coro: Callable[[], Coroutine]):
    """Run a coroutine to completion from blocking code, also when this thread already runs an event loop
    (then on a thread of its own, since one thread cannot run two loops)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make_coro())
    box: dict = {}

    def target():
        try:
            box["result"] = asyncio.run(make_coro())
        except BaseException as e:  # handed to the caller
            box["error"] = e

    t = threading.Thread(target=target, name="thinkrl-run-sync")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["result"]
