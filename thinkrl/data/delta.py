"""Delta-learning preference pairs (Olmo 3's DPO data): the same prompts answered by a stronger and a weaker model;
chosen = the stronger's answer, rejected = the weaker's. The difference between the two is what DPO learns from,
more than the chosen answer's absolute quality.

    pairs, counts = make_pairs(read_generations("strong.jsonl"), read_generations("weak.jsonl"),
                               extract=task.extract_answer, verified=False, threshold=1.0)

Answers are paired per prompt id in sample order (the i-th answer of the stronger model with the i-th of the
weaker). A pair whose two answers are equal is dropped: equal extracted answers (`extract`, the task's
``extract_answer``), or, where either extracts none, equal text after whitespace normalisation. With `verified`
only pairs whose chosen answer is correct and rejected answer wrong (reward >= / < `threshold`) are kept.

A pair row is TRL's conversational preference format: ``id``, ``prompt`` (the prompt's messages), ``chosen`` and
``rejected`` (each one assistant message), plus ``sample``, ``chosen_model``, ``rejected_model`` and
``chosen_reward`` / ``rejected_reward`` when known.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from thinkrl.data.datasets import DataError


@dataclass
class PairCounts:
    pairs: int = 0  # written
    dropped_equal: int = 0  # chosen and rejected answers equal
    dropped_verifier: int = 0  # chosen not correct or rejected not wrong (verified only)
    unmatched: int = 0  # answers without a counterpart (a prompt only one model answered, or fewer samples)

    def line(self) -> str:
        return (f"{self.pairs} pairs; dropped: {self.dropped_equal} with equal answers, {self.dropped_verifier} by the "
                f"verifier; {self.unmatched} answers without a counterpart")


def _normalised(text: str) -> str:
    return " ".join(text.split())


def same_answer(a: str, b: str, extract: Callable[[str], str | None] | None = None) -> bool:
    """Whether two answers count as equal (see the module docstring)."""
    if extract is not None:
        x, y = extract(a), extract(b)
        if x is not None and y is not None:
            return x == y
    return _normalised(a) == _normalised(b)


def _by_id(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["id"], []).append(r)
    for v in out.values():
        v.sort(key=lambda r: r["sample"])
    return out


def make_pairs(chosen: list[dict], rejected: list[dict], extract: Callable[[str], str | None] | None = None,
               verified: bool = False, threshold: float = 1.0) -> tuple[list[dict], PairCounts]:
    """Pair rows of two generation files (thinkrl.data.files.read_generations) by prompt id. The prompts of one
    id must be the same in both (DataError naming both rows otherwise); `verified` needs rewards in both."""
    a, b = _by_id(chosen), _by_id(rejected)
    counts = PairCounts()
    pairs = []
    for pid in list(a) + [k for k in b if k not in a]:
        ca, cb = a.get(pid, []), b.get(pid, [])
        counts.unmatched += abs(len(ca) - len(cb))
        for x, y in zip(ca, cb):
            prompt = x["messages"][:-1]
            if y["messages"][:-1] != prompt:
                raise DataError(f"{y['where']}: prompt {pid!r} differs from the one at {x['where']}")
            ax, ay = x["messages"][-1]["content"], y["messages"][-1]["content"]
            if same_answer(ax, ay, extract):
                counts.dropped_equal += 1
                continue
            if verified:
                for r in (x, y):
                    if r["reward"] is None:
                        raise DataError(f"{r['where']}: --verified needs rewards, and this row's is null (generated "
                                        "without a verifier)")
                if not (x["reward"] >= threshold > y["reward"]):
                    counts.dropped_verifier += 1
                    continue
            row = {"id": pid, "sample": x["sample"],
                   "prompt": prompt, "chosen": [{"role": "assistant", "content": ax}],
                   "rejected": [{"role": "assistant", "content": ay}],
                   "chosen_model": x["model"], "rejected_model": y["model"]}
            if x["reward"] is not None:
                row["chosen_reward"] = float(x["reward"])
            if y["reward"] is not None:
                row["rejected_reward"] = float(y["reward"])
            pairs.append(row)
    counts.pairs = len(pairs)
    return pairs, counts
