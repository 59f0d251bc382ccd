"""Synthetic column addition, the quickstart task, with an imperfect teacher.

Prompt: ``347+85`` (or ``347+085`` with ``pad: true``: fixed-width operands, every column worked). A correct
answer works the columns from the right and ends in a box::

    7+5=12 4+8+1=13 3+1=4 \\boxed{432}        (padded: 7+5=12 4+8+1=13 3+0+1=4 \\boxed{432})

Reward 1 if the last ``\\boxed{...}`` equals the sum exactly, else 0 (the worked steps are not graded).

The **teacher** that writes the SFT demonstrations is wrong in a systematic way: on a fixed,
pseudo-random subset of problems (a hash of the operands picks it; fraction ``drop_rate``) it
forgets every carry (``7+5=12 4+8=12 3=3 \\boxed{322}``). A student cannot tell from the
operands which problems the teacher gets wrong, so imitation learns "drop the carry" with
probability ~drop_rate; the verifier knows better, which is what RL exploits.
"""
from __future__ import annotations

import hashlib
import random
import re

from thinkrl.tasks.base import Task, register_task
from thinkrl.types import Sample

_BOX = re.compile(r"\\boxed\{([^{}]*)\}")


def last_boxed(text: str) -> str | None:
    found = _BOX.findall(text)
    return found[-1].strip() if found else None


def worked_solution(a: int, b: int, carries: bool = True, width: int = 0) -> tuple[str, int]:
    """Column addition from the right; with carries=False every carry is forgotten.

    `width` > 0 works every one of `width` columns (leading zeros included), as in a zero-padded prompt.
    """
    da, db = f"{a:0{width}d}"[::-1], f"{b:0{width}d}"[::-1]
    steps, digits, carry = [], [], 0
    for i in range(max(len(da), len(db))):
        terms = [int(s[i]) for s in (da, db) if i < len(s)]
        if carries and carry:
            terms.append(carry)
        total = sum(terms)
        steps.append("+".join(map(str, terms)) + f"={total}")
        digits.append(total % 10)
        carry = total // 10
    if carries and carry:
        digits.append(carry)
    answer = int("".join(map(str, reversed(digits))))
    return " ".join(steps) + f" \\boxed{{{answer}}}", answer


def has_carry(a: int, b: int) -> bool:
    return worked_solution(a, b, True)[1] != worked_solution(a, b, False)[1]


@register_task("arithmetic")
class Arithmetic(Task):
    """Addition of two numbers of 1..max_digits digits; teacher drops carries on `drop_rate` of problems."""

    reward_isolation = "inline"  # a boxed-string comparison

    def __init__(self, system_prompt: str = "", min_digits: int = 1, max_digits: int = 3,
                 drop_rate: float = 0.6, pad: bool = False, salt: str = "thinkrl", **params):
        super().__init__(system_prompt=system_prompt, **params)
        if not 1 <= min_digits <= max_digits <= 12:
            raise ValueError(f"task arithmetic: need 1 <= min_digits <= max_digits <= 12, got {min_digits}, {max_digits}")
        if not 0.0 <= drop_rate <= 1.0:
            raise ValueError(f"task arithmetic: drop_rate must be in [0, 1], got {drop_rate}")
        self.min_digits, self.max_digits, self.drop_rate, self.salt = min_digits, max_digits, drop_rate, salt
        self.width = max_digits if pad else 0  # pad: operands written with leading zeros to a fixed width

    # ------------------------------------------------------------------ data
    def _operand(self, rng: random.Random) -> int:
        d = rng.randint(self.min_digits, self.max_digits)
        return rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1)

    def generate(self, n: int, seed: int) -> list[Sample]:
        rng = random.Random(f"arith-{seed}")
        out = []
        for i in range(n):
            a, b = self._operand(rng), self._operand(rng)
            w = self.width
            out.append(Sample(id=f"{seed}-{i}", prompt=f"{a:0{w}d}+{b:0{w}d}", answer=a + b, meta={"a": a, "b": b}))
        return out

    # ------------------------------------------------------------------ reward
    def extract_answer(self, response: str) -> str | None:
        return last_boxed(response)

    def reward(self, response: str, sample: Sample) -> float:
        got = last_boxed(response)
        return 1.0 if got is not None and got == str(sample.answer) else 0.0

    # ------------------------------------------------------------------ teacher
    def teacher_drops(self, a: int, b: int) -> bool:
        h = hashlib.sha256(f"{self.salt}:{a}+{b}".encode()).digest()
        return int.from_bytes(h[:4], "big") / 2**32 < self.drop_rate

    def demonstration(self, sample: Sample, rng=None) -> str:
        a, b = sample.meta["a"], sample.meta["b"]
        return worked_solution(a, b, carries=not self.teacher_drops(a, b), width=self.width)[0]

    def weak_demonstration(self, sample: Sample) -> str:
        """The weaker teacher (the rejected side of the quickstart's delta pairs): drops every carry, always."""
        a, b = sample.meta["a"], sample.meta["b"]
        return worked_solution(a, b, carries=False, width=self.width)[0]

    def teacher_accuracy(self, samples: list[Sample]) -> float:
        return sum(self.reward(self.demonstration(s), s) for s in samples) / max(len(samples), 1)
