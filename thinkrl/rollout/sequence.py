"""What the embedded engine schedules: a Request (one generate call: a prompt, its sampling parameters, n
samples) and its n Sequences (one sample each: a KV slot while it runs, a seed, and the versions of the
weights its tokens were generated with)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from thinkrl.types import Generation, SamplingParams

_M32 = 0xFFFFFFFF


@dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    on_done: Callable[[Any], None]  # called with the n Generations, or with an exception
    stop_ids: list[int]
    seqs: list[Sequence] = field(default_factory=list)
    left: int = 0  # sequences not finished yet
    window: int = 0  # decoded tokens searched for stop strings
    cancelled: bool = False
    on_tokens: Callable[[list], None] | None = None  # streamed: called after each step with [(index, token,
    # logprob, top-N or None)] for the sequences that sampled a token

    @property
    def need(self) -> int:  # reserved KV positions per sequence
        return len(self.prompt) + self.params.max_new_tokens

    def results(self) -> list[Generation]:
        return [s.result for s in self.seqs]


@dataclass(eq=False)
class Sequence:
    req: Request
    seed: int
    slot: int = -1  # KV slot while running, else -1
    t0: int = 0  # current position = t0 + decode steps the engine has run
    marks: list = field(default_factory=list)  # [(token index, version)] where the version changes
    text: list | None = None  # generated ids, kept only to check stop strings
    result: Generation | None = None

    @property
    def filtered(self) -> bool:  # samples with top-k or top-p
        return self.req.params.top_k > 0 or self.req.params.top_p < 1

    @property
    def scaled(self) -> bool:  # samples at a temperature other than 1
        return self.req.params.temperature != 1

    def start(self, t0: int, version: int) -> None:
        """Admitted: generation starts at position len(prompt) with the weights of `version`."""
        self.t0, self.marks = t0, [(0, version)]
        self.text = [] if self.req.params.stop else None

    def versions(self, n: int) -> list[int]:
        """The version of each of the first n generated tokens."""
        out, marks = [], self.marks + [(n, None)]
        for (start, v), (end, _) in zip(marks, marks[1:]):
            out += [v] * max(0, end - max(start, len(out)))
        return out


def new_request(prompt, params: SamplingParams | None, n: int, on_done, *, vocab: int, max_len: int,
                max_tokens: int, eos_ids: list[int], tokenizer) -> Request:
    """Validate one generate call (ValueError naming the bad field) and build its n sequences."""
    prompt, params = [int(t) for t in prompt], params or SamplingParams()
    if not prompt or min(prompt) < 0 or max(prompt) >= vocab:
        raise ValueError(f"input_ids: need a non-empty list of token ids in [0, {vocab})")
    checks = [("n", n >= 1), ("max_new_tokens", params.max_new_tokens >= 1),
              ("temperature", params.temperature >= 0), ("top_p", 0 < params.top_p <= 1),
              ("top_k", params.top_k >= 0)]
    for name, ok in checks:
        if not ok:
            raise ValueError(f"SamplingParams.{name}: invalid value {getattr(params, name, n)!r}")
    if params.stop and tokenizer is None:
        raise ValueError("SamplingParams.stop: stop strings need an engine built with a tokenizer")
    req = Request(prompt, params, on_done, sorted(set(params.stop_token_ids) | set(eos_ids)))
    if req.need > max_len:
        raise ValueError(f"SamplingParams.max_new_tokens: prompt ({len(prompt)}) + max_new_tokens "
                         f"({params.max_new_tokens}) exceeds the engine's max_len ({max_len})")
    if req.need > max_tokens:
        raise ValueError(f"SamplingParams.max_new_tokens: one sequence needs {req.need} tokens, more than "
                         f"max_tokens ({max_tokens})")
    req.window = max((len(s) for s in params.stop), default=0) + 8
    # unseeded requests draw their seed from torch's global RNG: torch.manual_seed(run.seed) and the RNG state
    # saved in checkpoints then make sampling (and resume) reproducible
    base = int(torch.randint(0, 2**31 - 1, (1,)).item()) if params.seed is None else params.seed & _M32
    req.seqs = [Sequence(req, (base ^ ((i + 1) * 0x9E3779B9)) & _M32) for i in range(n)]
    req.left = n
    return req
