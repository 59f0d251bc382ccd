"""Countdown: reach a target number with + - * / using each given number exactly once.

The rule is TinyZero's: the answer is the last ``<answer>...</answer>`` (or, failing that, the
last ``\\boxed{...}``); it must be an arithmetic expression whose numbers are exactly the given
numbers (each used once), and its value must equal the target. Reward 1.0; a well-formed
expression that misses the target or uses the wrong numbers gets `format_score` (default 0);
anything else 0.

Expressions are evaluated with `ast` and exact fractions (never `eval`): only numbers, + - * /,
unary minus and parentheses (and ``**`` with small integer exponents when ``allow_pow=True``).
Division by zero, huge exponents and over-long answers are rejected.

    task = make_task("countdown", {"num_numbers": 4})
    [s] = task.generate(1, seed=0)   # s.answer == {"numbers": [...], "target": t}; solvable by construction
"""
from __future__ import annotations

import ast
import random
import re
from fractions import Fraction

from thinkrl.tasks.base import Task, register_task
from thinkrl.tasks.math import last_boxed
from thinkrl.types import Sample

MAX_EXPR_CHARS = 300
MAX_POW_EXPONENT = 16
MAX_ABS_VALUE = 10**30  # intermediate results beyond this are rejected

PROMPT = (
    "Using the numbers {numbers}, create an equation that equals {target}. You can use basic arithmetic "
    "operations (+, -, *, /) and each number must be used exactly once. Show your work in <think> </think> "
    "tags. And return the final equation in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>."
)

_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b, ast.Div: None, ast.Pow: None}


class BadExpression(ValueError):
    """Not an allowed arithmetic expression."""


def extract_expression(response: str) -> str | None:
    """The last ``<answer>...</answer>``; else the last ``\\boxed{...}``; None if neither."""
    found = re.findall(r"<answer>(.*?)</answer>", response, flags=re.DOTALL)
    if found:
        return found[-1].strip()
    return last_boxed(response)


def evaluate(expr: str, allow_pow: bool = False) -> tuple[Fraction, list[int]]:
    """(exact value, numbers used in order). Raises BadExpression for anything not allowed."""
    if len(expr) > MAX_EXPR_CHARS:
        raise BadExpression(f"expression longer than {MAX_EXPR_CHARS} characters")
    expr = expr.replace("\\times", "*").replace("\\cdot", "*").replace("×", "*").replace("÷", "/").replace("\\div", "/")
    if "=" in expr:  # "1 + 2 * 3 = 7": judge the left side
        expr = expr.split("=", 1)[0]
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise BadExpression("not a valid expression") from None
    used: list[int] = []

    def ev(node) -> Fraction:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Div):
                if b == 0:
                    raise BadExpression("division by zero")
                out = a / b
            elif isinstance(node.op, ast.Pow):
                if not allow_pow:
                    raise BadExpression("** is not allowed")
                if b.denominator != 1 or abs(b) > MAX_POW_EXPONENT or (a == 0 and b < 0):
                    raise BadExpression(f"exponents must be integers with |e| <= {MAX_POW_EXPONENT}")
                out = a ** int(b)
            else:
                out = _BINOPS[type(node.op)](a, b)
            if abs(out.numerator) > MAX_ABS_VALUE * out.denominator or out.denominator > MAX_ABS_VALUE:
                raise BadExpression("number too large")
            return out
        raise BadExpression(f"{type(node).__name__} is not allowed")

    try:
        return ev(tree), used
    except RecursionError:
        raise BadExpression("expression nested too deeply") from None


def _numbers_target(sample: Sample) -> tuple[list[int], int]:
    src = sample.answer if isinstance(sample.answer, dict) else sample.meta.get("row", sample.meta)
    if not isinstance(src, dict):
        raise ValueError(f"countdown sample {sample.id}: answer must be a dict with 'numbers' (or 'nums') and 'target'")
    nums = src.get("numbers", src.get("nums"))
    target = src.get("target")
    if nums is None or target is None:
        raise ValueError(f"countdown sample {sample.id}: needs 'numbers' (or 'nums') and 'target', got keys {sorted(src)}")
    return [int(x) for x in nums], int(target)


def score(response: str, numbers: list[int], target: int, format_score: float = 0.0, allow_pow: bool = False) -> float:
    """TinyZero's countdown reward for one response (see the module docstring)."""
    expr = extract_expression(response)
    if not expr:
        return 0.0
    try:
        value, used = evaluate(expr, allow_pow)
    except BadExpression:
        return 0.0
    if sorted(used) == sorted(numbers) and value == target:
        return 1.0
    return float(format_score)


@register_task("countdown")
class Countdown(Task):
    """Countdown numbers game; `generate` makes instances solvable by construction."""

    reward_isolation = "inline"  # an AST walk of <= 300 characters with bounded values

    def __init__(self, system_prompt: str = "", num_numbers: int = 4, min_number: int = 1, max_number: int = 99,
                 min_target: int = 1, max_target: int = 100, format_score: float = 0.0, allow_pow: bool = False,
                 prompt_template: str = PROMPT, **params):
        super().__init__(system_prompt=system_prompt, **params)
        if not 2 <= num_numbers <= 8:
            raise ValueError(f"task countdown: num_numbers must be in [2, 8], got {num_numbers}")
        if not 1 <= min_number <= max_number:
            raise ValueError(f"task countdown: need 1 <= min_number <= max_number, got {min_number}, {max_number}")
        if not min_target <= max_target:
            raise ValueError(f"task countdown: need min_target <= max_target, got {min_target}, {max_target}")
        if not 0.0 <= format_score <= 1.0:
            raise ValueError(f"task countdown: format_score must be in [0, 1], got {format_score}")
        if "{numbers}" not in prompt_template or "{target}" not in prompt_template:
            raise ValueError("task countdown: prompt_template needs {numbers} and {target}")
        self.num_numbers, self.min_number, self.max_number = num_numbers, min_number, max_number
        self.min_target, self.max_target = min_target, max_target
        self.format_score, self.allow_pow, self.prompt_template = format_score, allow_pow, prompt_template

    def build_prompt(self, sample: Sample) -> list[dict]:
        if sample.prompt:
            return super().build_prompt(sample)
        nums, target = _numbers_target(sample)
        text = self.prompt_template.format(numbers=nums, target=target)
        return super().build_prompt(Sample(id=sample.id, prompt=text))

    def extract_answer(self, response: str) -> str | None:
        return extract_expression(response)

    def reward(self, response: str, sample: Sample) -> float:
        nums, target = _numbers_target(sample)
        return score(response, nums, target, self.format_score, self.allow_pow)

    def generate(self, n: int, seed: int) -> list[Sample]:
        rng = random.Random(f"countdown-{seed}")
        out = []
        while len(out) < n:
            nums = [rng.randint(self.min_number, self.max_number) for _ in range(self.num_numbers)]
            found = _random_solution(nums, rng, self.min_target, self.max_target)
            if found is None:
                continue
            expr, target = found
            out.append(Sample(id=f"countdown-{seed}-{len(out)}", prompt=self.prompt_template.format(numbers=nums, target=target),
                              answer={"numbers": nums, "target": target}, meta={"solution": expr}))
        return out

    def demonstration(self, sample: Sample, rng=None) -> str:
        expr = sample.meta.get("solution")
        if expr is None:
            raise NotImplementedError("countdown: only generated samples carry a solution")
        return f"<think>Combine the numbers step by step.</think> <answer>{expr}</answer>"


def _random_solution(nums: list[int], rng: random.Random, lo: int, hi: int, tries: int = 50) -> tuple[str, int] | None:
    """Combine all numbers in random order with random operations (integer, non-negative steps)."""
    for _ in range(tries):
        items = [(str(x), x) for x in nums]
        rng.shuffle(items)
        while len(items) > 1:
            i, j = rng.sample(range(len(items)), 2)
            (ea, a), (eb, b) = items[i], items[j]
            ops = [("+", a + b), ("*", a * b)]
            if a - b >= 0:
                ops.append(("-", a - b))
            if b and a % b == 0:
                ops.append(("/", a // b))
            op, val = rng.choice(ops)
            items = [it for k, it in enumerate(items) if k not in (i, j)] + [(f"({ea} {op} {eb})", val)]
        expr, val = items[0]
        if lo <= val <= hi:
            return expr[1:-1] if expr.startswith("(") and expr.endswith(")") else expr, val
    return None
