"""Math word problems checked with Hugging Face ``math-verify`` (GSM8K, MATH, ...).

The reward takes the **last** ``\\boxed{...}`` of the response (nested braces are fine), or the
last match of a configured ``answer_regex``, and compares it with the gold answer using
math-verify: equal numbers in any form (``0.5``, ``\\frac{1}{2}``, ``1/2``, ``50\\%``), LaTeX
expressions, intervals, sets, tuples. No answer, or a wrong one, scores 0.

    task = make_task("math")                          # or params={"answer_regex": r"Answer: (.+)"}
    verify(r"... so \\boxed{\\frac{1}{2}}", "0.5")   # True

Gold answers may be given as GSM8K answer fields (``"...#### 18"``: the part after ``####`` is used)
or MATH ``answer`` fields (LaTeX). `load_gsm8k` / `load_math` read those files.

Timeouts: math-verify's own timeouts use ``signal.alarm``, which works only in the main thread, so
here they are off and `call_with_timeout` (works in any thread) bounds each check instead. Inputs
that would make SymPy compute huge numbers inside one C call (``9^{9^{9}}``, ``(10^9)!``), which no
in-thread timeout can interrupt, are rejected before comparison (they score 0).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

from thinkrl.tasks.base import Task, register_task
from thinkrl.tasks.isolation import RewardTimeout, call_with_timeout
from thinkrl.types import Sample

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
MAX_ANSWER_CHARS = 1000  # longer extracted answers score 0 without being parsed
MAX_NESTING = 10  # deeper brace/bracket nesting scores 0 (math-verify parses it in seconds to minutes)
MAX_DIGITS = 100_000  # powers / factorials whose value would have more digits are rejected

log = logging.getLogger(__name__)


class _DropTimeoutWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:  # we handle timeouts ourselves
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutWarning())


# ----------------------------------------------------------------------------- extraction


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), with nested braces; None if none is closed."""
    best = None
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            best = text[m.end(): i - 1]
    return best.strip() if best is not None else None


def extract_answer(response: str, answer_regex: str | re.Pattern | None = None) -> str | None:
    """The answer part of a response: last match of `answer_regex` (group 1 if any), else the last box."""
    if answer_regex:
        matches = list(re.finditer(answer_regex, response))
        if not matches:
            return None
        m = matches[-1]
        return (m.group(1) if m.re.groups else m.group(0)).strip()
    return last_boxed(response)


def gold_answer(answer) -> str:
    """The gold answer as a string; GSM8K answer fields keep only what follows ``####``."""
    text = str(answer)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    return text.strip()


def _nesting(text: str) -> int:
    depth = best = 0
    for ch in text:
        if ch in "{([":
            depth += 1
            best = max(best, depth)
        elif ch in "})]":
            depth = max(depth - 1, 0)
    return best


def _has_delimiters(text: str) -> bool:
    return any(tok in text for tok in ("$", "\\boxed", "\\fbox", "\\[", "\\("))


def _is_bare(text: str) -> bool:
    """A short one-line answer without LaTeX delimiters (not a whole response)."""
    text = text.strip()
    return not _has_delimiters(text) and "\n" not in text and len(text) <= 200


# ----------------------------------------------------------------------------- safety of parsed values


def _too_big(expr) -> bool:
    """True if evaluating `expr` could compute a number with more than MAX_DIGITS digits."""
    import math

    import sympy

    if not isinstance(expr, sympy.Basic):
        return False

    def size(x) -> float:  # |value| of a numeric sub-expression (its own powers are already checked)
        return abs(complex(x.evalf(30)))

    try:
        for node in sympy.postorder_traversal(expr):  # children first
            if isinstance(node, sympy.Pow):
                base, exp = node.args
                if exp.free_symbols:
                    continue
                b = size(base) if not base.free_symbols else 10.0
                if b > 0 and size(exp) * abs(math.log10(b)) > MAX_DIGITS:
                    return True
            elif isinstance(node, (sympy.factorial, sympy.factorial2, sympy.binomial, sympy.gamma)):
                if any(not a.free_symbols and size(a) > 20_000 for a in node.args):
                    return True
    except (OverflowError, TypeError, ValueError):
        return True
    return False


# ----------------------------------------------------------------------------- checking


def _parse(text: str) -> list:
    from math_verify import parse

    return parse(text, parsing_timeout=None)


def _parse_gold(gold: str) -> list:
    gold = gold_answer(gold)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", gold):
        gold = gold.replace(",", "")
    return _parse(gold if _has_delimiters(gold) else f"\\boxed{{{gold}}}")


def _verify_now(prediction: str, gold: str) -> bool:
    from math_verify import verify as mv_verify

    if len(prediction) > 50 * MAX_ANSWER_CHARS:
        prediction = prediction[-50 * MAX_ANSWER_CHARS:]
    golds = _parse_gold(gold)
    if not golds:
        return False
    candidates = []
    if _is_bare(prediction):  # a bare answer such as "[1, 2)" or "\frac{1}{2}"
        candidates.append(_parse(f"\\boxed{{{prediction.strip()}}}"))
    candidates.append(_parse(prediction))  # math-verify's own extraction from a whole response
    for pred in candidates:
        pred = [p for p in pred if not _too_big(p)]
        if pred and mv_verify(golds, pred, timeout_seconds=None):
            return True
    return False


def verify(prediction: str, gold: str, timeout: float = 5.0) -> bool:
    """True if `prediction` (a whole response or a bare answer) matches `gold` by math-verify.

    Works in any thread; False on timeout, on parse failure, and on over-long or too deeply nested
    input (see MAX_ANSWER_CHARS, MAX_NESTING, MAX_DIGITS).
    """
    if not isinstance(prediction, str) or not prediction.strip():
        return False
    target = last_boxed(prediction)
    if target is None and _is_bare(prediction):
        target = prediction.strip()
    if target is not None and (len(target) > MAX_ANSWER_CHARS or _nesting(target) > MAX_NESTING):
        return False  # whole responses without a box rely on the timeout alone
    try:
        return bool(call_with_timeout(_verify_now, timeout, prediction, str(gold)))
    except RewardTimeout:
        log.debug("math verify timed out on %.80r", prediction)
        return False
    except (RecursionError, MemoryError, ValueError, TypeError, OverflowError, ZeroDivisionError):
        return False


# ----------------------------------------------------------------------------- loaders


def load_gsm8k(path: str | Path, limit: int | None = None) -> list[Sample]:
    """GSM8K JSONL (``question``, ``answer`` ending in ``#### N``) -> Samples with answer ``"N"`` (data.format=gsm8k)."""
    from thinkrl.data.formats import load_format

    return load_format(path, "gsm8k", limit)


def load_math(path: str | Path, limit: int | None = None) -> list[Sample]:
    """MATH / MATH-500 JSONL (``problem``, ``answer``; ``unique_id`` when present) -> Samples (data.format=math500)."""
    from thinkrl.data.formats import load_format

    return load_format(path, "math500", limit)


# ----------------------------------------------------------------------------- the task


@register_task("math")
class MathTask(Task):
    """Prompt = problem + `instruction`; reward 1 if the last box (or `answer_regex`) matches the gold answer."""

    # math-verify runs SymPy: its own timeout (`timeout`, in-thread) cannot stop one long C call, and the inputs
    # known to cause one are rejected first, but not provably all of them: a worker process can be killed
    reward_isolation = "process"

    def __init__(self, system_prompt: str = "", instruction: str = DEFAULT_INSTRUCTION, answer_regex: str = "",
                 timeout: float = 5.0, **params):
        super().__init__(system_prompt=system_prompt, **params)
        if answer_regex:
            try:
                re.compile(answer_regex)
            except re.error as e:
                raise ValueError(f"task math: answer_regex {answer_regex!r} is not a valid regex ({e})") from None
        if not timeout or timeout <= 0:
            raise ValueError(f"task math: timeout must be > 0 seconds, got {timeout!r}")
        self.instruction, self.answer_regex, self.timeout = instruction, answer_regex, float(timeout)

    def build_prompt(self, sample: Sample) -> list[dict]:
        msgs = super().build_prompt(sample)
        if self.instruction and isinstance(sample.prompt, str):
            msgs[-1]["content"] = f"{msgs[-1]['content']}\n{self.instruction}"
        return msgs

    def extract_answer(self, response: str) -> str | None:
        return extract_answer(response, self.answer_regex)

    def reward(self, response: str, sample: Sample) -> float:
        if sample.answer is None or str(sample.answer).strip() == "":
            raise ValueError(f"math sample {sample.id}: no gold answer (check data.answer_field)")
        answer = extract_answer(response, self.answer_regex)
        if answer is None or not answer or len(answer) > MAX_ANSWER_CHARS:
            return 0.0
        return 1.0 if verify(f"\\boxed{{{answer}}}", gold_answer(sample.answer), timeout=self.timeout) else 0.0

    def __setstate__(self, state: dict) -> None:
        """A reward worker unpickles the task before its first timed call: import math-verify (and SymPy) now."""
        self.__dict__.update(state)
        import math_verify  # noqa: F401

    def demonstration(self, sample: Sample, rng=None) -> str:
        return f"The answer is \\boxed{{{gold_answer(sample.answer)}}}."
