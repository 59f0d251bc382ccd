"""Evaluation figures from per-problem results: pass@k (unbiased), maj@k, avg@k, lengths, tokens and cost.

Pure functions on plain data (no engine, no model), so every figure can be recomputed from `per_problem.jsonl`:

    rows = [ProblemResult(id="p0", greedy_correct=True, correct=[True, False, True], answers=["4", "5", "4"],
                          lengths=[12, 9, 30, 11], truncated=[False, False, True, False]), ...]
    figures = summarize(rows, k=3, price_per_mtok=0.5)   # {"pass@1": ..., "pass@3": ..., "maj@3": ..., ...}
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from math import comb

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", eq. 1):
    the probability that at least one of k answers drawn without replacement from n samples, c of them
    correct, is correct: 1 - C(n - c, k) / C(n, k). Needs 1 <= k <= n."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def majority_vote(answers: list[str | None], correct: list[bool]) -> bool:
    """maj@k for one problem: whether the most frequent extracted answer is a correct one.

    Samples without an answer (None) do not vote; with no answer at all the vote is wrong. A tie between
    answers goes to the one that occurs first in sample order. The voted answer is as correct as its first
    sample (samples with the same extracted answer normally share their correctness)."""
    if len(answers) != len(correct):
        raise ValueError(f"majority_vote: {len(answers)} answers but {len(correct)} correctness flags")
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return False
    top = max(votes.values())
    winner = next(a for a in answers if a is not None and votes[a] == top)  # first in sample order
    return correct[answers.index(winner)]


@dataclass
class ProblemResult:
    """One problem's evaluation: the greedy answer and k sampled ones (the rows of per_problem.jsonl).

    `lengths` and `truncated` cover every generated answer, the greedy one first, then the k samples."""

    id: str
    greedy_correct: bool
    greedy_reward: float
    correct: list[bool] = field(default_factory=list)  # the k samples
    answers: list[str | None] = field(default_factory=list)  # the k samples' extracted answers
    lengths: list[int] = field(default_factory=list)  # generated tokens, greedy first
    truncated: list[bool] = field(default_factory=list)  # stopped by the token limit, greedy first
    greedy_answer: str | None = None

    @property
    def num_samples(self) -> int:
        return len(self.correct)

    @property
    def num_correct(self) -> int:
        return sum(self.correct)

    def to_row(self) -> dict:
        return {"id": self.id, "num_samples": self.num_samples, "num_correct": self.num_correct,
                "answers": self.answers, "correct": self.correct, "greedy_correct": self.greedy_correct,
                "greedy_reward": self.greedy_reward, "greedy_answer": self.greedy_answer,
                "lengths": self.lengths, "truncated": self.truncated}

    @classmethod
    def from_row(cls, row: dict) -> "ProblemResult":
        return cls(id=row["id"], greedy_correct=row["greedy_correct"], greedy_reward=row["greedy_reward"],
                   correct=list(row["correct"]), answers=list(row["answers"]), lengths=list(row["lengths"]),
                   truncated=list(row["truncated"]), greedy_answer=row.get("greedy_answer"))


def summarize(rows: list[ProblemResult], k: int, price_per_mtok: float = 0.0) -> dict:
    """The flat evaluation figures of `rows` (each with k samples when k > 0):

    pass@1 (greedy accuracy), reward/greedy, num_problems, k; with k > 0 pass@j for j = 2..k and pass@1/sampled
    (the unbiased estimator on the samples), maj@k, avg@k (mean fraction of correct samples); len/mean, len/p50,
    len/p90, len/max and truncated_frac over every generated answer; tokens_per_problem (generated tokens, greedy
    included), cost_per_problem_usd and cost_usd at `price_per_mtok` USD per million generated tokens."""
    n = len(rows)
    if n == 0:
        raise ValueError("summarize: no problems evaluated")
    bad = [r.id for r in rows if r.num_samples != k]
    if bad:
        raise ValueError(f"summarize: problem {bad[0]!r} has {next(r.num_samples for r in rows if r.id == bad[0])} "
                         f"samples, expected k={k}")
    out: dict = {
        "pass@1": sum(r.greedy_correct for r in rows) / n,
        "reward/greedy": sum(r.greedy_reward for r in rows) / n,
        "num_problems": n,
        "k": k,
    }
    if k > 0:
        out["pass@1/sampled"] = float(np.mean([pass_at_k(k, r.num_correct, 1) for r in rows]))
        for j in range(2, k + 1):
            out[f"pass@{j}"] = float(np.mean([pass_at_k(k, r.num_correct, j) for r in rows]))
        out[f"maj@{k}"] = sum(majority_vote(r.answers, r.correct) for r in rows) / n
        out[f"avg@{k}"] = float(np.mean([r.num_correct / k for r in rows]))
    lengths = np.array([x for r in rows for x in r.lengths], dtype=np.float64)
    truncated = [t for r in rows for t in r.truncated]
    if lengths.size:
        out.update({"len/mean": float(lengths.mean()), "len/p50": float(np.percentile(lengths, 50)),
                    "len/p90": float(np.percentile(lengths, 90)), "len/max": int(lengths.max()),
                    "truncated_frac": sum(truncated) / len(truncated)})
    tokens = float(lengths.sum()) / n
    out["tokens_per_problem"] = tokens
    out["cost_per_problem_usd"] = tokens * price_per_mtok / 1e6
    out["cost_usd"] = float(lengths.sum()) * price_per_mtok / 1e6
    return out
