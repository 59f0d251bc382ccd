"""Calculator: evaluate an arithmetic expression; optionally with a calculator tool (multi-turn).

Prompt: ``What is 23 * 17 + 4?``. Reward 1 if the last ``\\boxed{...}`` holds the exact value (an integer,
a decimal or a fraction such as ``7/2``), else 0.

With ``tool=True`` the system prompt offers a calculator: the model writes ``<calc>23 * 17 + 4</calc>``,
`thinkrl.rollout.multiturn.ToolWorkflow` stops generation at ``</calc>``, evaluates the expression
safely (`calculate`: `ast` and exact fractions via `thinkrl.tasks.countdown.evaluate`, never `eval`) and
appends ``<result>395</result>``; the model continues. ``few_shot=k`` puts k worked examples (as chat
turns) before the question, which small instruct models need to pick up the answer format.

    task = make_task("calculator", {"ops": "+", "max_value": 20, "tool": False, "few_shot": 2})
"""
from __future__ import annotations

import random
from fractions import Fraction

from thinkrl.tasks.base import Task, register_task
from thinkrl.tasks.countdown import BadExpression, evaluate
from thinkrl.tasks.math import last_boxed
from thinkrl.types import Sample

TOOL_PROMPT = (
    "You can use a calculator: write <calc>expression</calc> and its value appears as <result>value</result>. "
    "Use it for the arithmetic, then give the final answer in \\boxed{}."
)
PLAIN_PROMPT = "Solve the arithmetic problem. End with the result in \\boxed{}."
QUESTION = "What is {expr}?"
RESULT = "<result>{}</result>"
MAX_ANSWER_CHARS = 100


def format_value(v: Fraction) -> str:
    """An exact integer, else a decimal with up to 6 places (``7/3`` -> ``2.333333``)."""
    if v.denominator == 1:
        return str(v.numerator)
    return f"{float(v):.6f}".rstrip("0").rstrip(".")


def calculate(expr: str) -> str:
    """The calculator tool: the value of `expr`, or ``error: <reason>`` (the input is never echoed back)."""
    try:
        value, _ = evaluate(expr.strip())
    except BadExpression as e:
        return f"error: {e}"
    return format_value(value)


def parse_number(text: str) -> Fraction | None:
    """``"1,234"``, ``"-3"``, ``"2.5"``, ``"7/2"`` -> Fraction; None when it is not a plain number."""
    t = text.strip().replace(",", "").replace(" ", "").replace("$", "")
    if not t or len(t) > MAX_ANSWER_CHARS:
        return None
    try:
        return Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None


@register_task("calculator")
class Calculator(Task):
    """Expressions of `min_operands`..`max_operands` integers in [min_value, max_value] joined by `ops`."""

    reward_isolation = "inline"  # a boxed number compared as a Fraction of <= 1000 characters

    def __init__(self, system_prompt: str = "", min_operands: int = 2, max_operands: int = 3, min_value: int = 2,
                 max_value: int = 99, ops: str = "+-*", tool: bool = True, few_shot: int = 0, **params):
        super().__init__(system_prompt=system_prompt, **params)
        if not 1 <= min_operands <= max_operands <= 8:
            raise ValueError(f"task calculator: need 1 <= min_operands <= max_operands <= 8, got {min_operands}, {max_operands}")
        if not 0 <= min_value <= max_value <= 10**9:
            raise ValueError(f"task calculator: need 0 <= min_value <= max_value <= 1e9, got {min_value}, {max_value}")
        if not ops or set(ops) - set("+-*"):
            raise ValueError(f"task calculator: ops must be a non-empty string of + - *, got {ops!r}")
        if not isinstance(tool, bool):
            raise ValueError(f"task calculator: tool must be true or false, got {tool!r}")
        if not 0 <= few_shot <= 8:
            raise ValueError(f"task calculator: few_shot must be in 0..8, got {few_shot}")
        self.min_operands, self.max_operands = min_operands, max_operands
        self.min_value, self.max_value, self.ops = min_value, max_value, ops
        self.tool, self.few_shot = tool, few_shot
        if not self.system_prompt:
            self.system_prompt = TOOL_PROMPT if tool else PLAIN_PROMPT
        self._examples = self._make(few_shot, random.Random("calculator-few-shot"), "shot")

    # ------------------------------------------------------------------ data
    def _make(self, n: int, rng: random.Random, prefix: str) -> list[Sample]:
        out = []
        for i in range(n):
            k = rng.randint(self.min_operands, self.max_operands)
            nums = [rng.randint(self.min_value, self.max_value) for _ in range(k)]
            expr = str(nums[0])
            for x in nums[1:]:
                expr += f" {rng.choice(self.ops)} {x}"
            value, _ = evaluate(expr)
            out.append(Sample(id=f"{prefix}-{i}", prompt=QUESTION.format(expr=expr), answer=format_value(value),
                              meta={"expr": expr}))
        return out

    def generate(self, n: int, seed: int) -> list[Sample]:
        return self._make(n, random.Random(f"calculator-{seed}"), str(seed))

    # ------------------------------------------------------------------ prompt
    def build_prompt(self, sample: Sample) -> list[dict]:
        msgs = super().build_prompt(sample)
        if self._examples and isinstance(sample.prompt, str):
            shots = []
            for ex in self._examples:
                shots += [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": self.demonstration(ex)}]
            at = 1 if msgs and msgs[0]["role"] == "system" else 0
            msgs[at:at] = shots
        return msgs

    def demonstration(self, sample: Sample, rng=None) -> str:
        expr, value = sample.meta["expr"], sample.answer
        if self.tool:
            return f"<calc>{expr}</calc>{RESULT.format(value)} The answer is \\boxed{{{value}}}."
        return f"{expr} = {value}. The answer is \\boxed{{{value}}}."

    # ------------------------------------------------------------------ tools and reward
    @property
    def tools(self) -> dict:
        """Tag name -> function(text) -> result text, for `ToolWorkflow`."""
        return {"calc": calculate} if self.tool else {}

    def extract_answer(self, response: str) -> str | None:
        return last_boxed(response)

    def reward(self, response: str, sample: Sample) -> float:
        gold = parse_number(str(sample.answer))
        if gold is None:
            raise ValueError(f"calculator sample {sample.id}: answer {sample.answer!r} is not a number")
        box = last_boxed(response)
        got = parse_number(box) if box is not None else None
        return 1.0 if got is not None and got == gold else 0.0
