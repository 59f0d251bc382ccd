"""The few data types that cross module boundaries.

Everything here is a plain dataclass: no tensors, no models, no I/O. Rollout produces
`Trajectory` objects; the algorithm turns a list of them into a `Batch` with per-token
advantages; the trainer consumes the `Batch`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sample:
    """One dataset row after field mapping."""

    id: str
    prompt: list[dict] | str  # chat messages, or a raw string
    answer: Any = None
    meta: dict = field(default_factory=dict)


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)  # stop strings (engine needs a tokenizer)
    seed: int | None = None
    top_logprobs: int = 0  # > 0: also return the N most likely tokens (and log-probs) at each position


@dataclass
class Generation:
    """What an inference engine returns for one sampled continuation."""

    tokens: list[int]  # generated token ids (prompt excluded)
    logprobs: list[float]  # log p(token) under the policy (temperature 1), one per token
    versions: list[int]  # policy version that produced each token
    finish: str  # "stop" | "length" | "abort"
    top_logprobs: list[list[tuple[int, float]]] | None = None  # SamplingParams.top_logprobs = N: per position, the
    # N most likely (token id, log-prob at temperature 1), most likely first


@dataclass
class Trajectory:
    """One sampled answer. Multi-turn episodes are one trajectory with several spans."""

    sample_id: str
    group_id: str  # the n answers of one prompt share group_id
    tokens: list[int]  # prompt + response(s)
    loss_mask: list[bool]  # True on the model's own tokens only
    logprobs: list[float]  # behaviour log-probs per token (0.0 where loss_mask is False)
    versions: list[int]  # policy version per token (-1 for prompt / non-model tokens)
    reward: float = 0.0
    finish: str = "stop"
    prompt_len: int = 0  # length of the shared prompt prefix (for shared-prompt packing)
    metrics: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if not (len(self.loss_mask) == len(self.logprobs) == len(self.versions) == n):
            raise ValueError(
                f"trajectory {self.sample_id}: tokens/loss_mask/logprobs/versions lengths differ "
                f"({n}, {len(self.loss_mask)}, {len(self.logprobs)}, {len(self.versions)})"
            )

    @property
    def num_response_tokens(self) -> int:
        return sum(self.loss_mask)


@dataclass
class Batch:
    """Trajectories plus per-token advantages (aligned with each trajectory's tokens)."""

    trajectories: list[Trajectory]
    advantages: list[list[float]]
    metrics: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.trajectories)

    @property
    def num_tokens(self) -> int:
        return sum(len(t.tokens) for t in self.trajectories)
