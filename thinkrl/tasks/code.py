"""Python programming problems graded by unit tests in a sandboxed subprocess.

The program is the last fenced ```` ```python ```` block of the response (```` ```py ```` too; a plain
```` ``` ```` block when there is no Python-tagged one). Reward = fraction of tests passed.

Test formats accepted in ``sample.answer`` (a JSON string of these also works):

* assert tests: ``["assert add(1, 2) == 3", ...]`` or ``{"tests": [...], "setup": "import math"}``
  (MBPP style: ``test_list`` and ``test_setup_code`` are accepted too);
* stdin/stdout tests: ``{"inputs": ["1 2\\n", ...], "outputs": ["3\\n", ...]}`` (APPS / TACO style).

The program runs in `thinkrl.tasks.sandbox` with the standard library only (``python -I -S``); what the
sandbox contains and what it does not: its docstring and docs/real_models.md ("The code sandbox").
"""
from __future__ import annotations

import json
import re

from thinkrl.tasks.base import Task, register_task
from thinkrl.tasks.sandbox import run_io_tests, run_tests
from thinkrl.types import Sample

DEFAULT_INSTRUCTION = "Write a complete Python solution. Put the final code in one ```python code block."

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_code(response: str) -> str | None:
    """Body of the last ```python (or ```py / ```python3) block; else of the last untagged block."""
    blocks = _FENCE.findall(response)
    tagged = [body for lang, body in blocks if lang.lower() in ("python", "py", "python3")]
    untagged = [body for lang, body in blocks if not lang]
    found = tagged or untagged
    return found[-1] if found else None


def parse_tests(answer) -> tuple[str, list, str]:
    """("assert" | "io", tests, setup code) from a sample's answer; ValueError if not recognised."""
    if isinstance(answer, str):
        try:
            answer = json.loads(answer)
        except json.JSONDecodeError:
            raise ValueError("code task: answer is a string but not JSON tests") from None
    if isinstance(answer, list) and all(isinstance(t, str) for t in answer):
        return "assert", list(answer), ""
    if isinstance(answer, dict):
        if "inputs" in answer and "outputs" in answer:
            ins, outs = answer["inputs"], answer["outputs"]
            if not isinstance(ins, list) or not isinstance(outs, list) or len(ins) != len(outs):
                raise ValueError("code task: 'inputs' and 'outputs' must be lists of the same length")
            return "io", [(_text(i), _text(o)) for i, o in zip(ins, outs)], ""
        tests = answer.get("tests", answer.get("test_list"))
        if isinstance(tests, list) and all(isinstance(t, str) for t in tests):
            return "assert", tests, str(answer.get("setup", answer.get("test_setup_code", "")) or "")
    raise ValueError("code task: answer must be a list of assert strings, {'tests': [...]} or {'inputs': [...], 'outputs': [...]}")


def _text(x) -> str:
    return "\n".join(map(str, x)) if isinstance(x, list) else str(x)


@register_task("code")
class CodeTask(Task):
    """Reward = fraction of unit tests the extracted program passes (0 without a code block)."""

    reward_isolation = "thread"  # the program runs in the sandbox's own subprocess with its own limits; the thread only waits on it

    def __init__(self, system_prompt: str = "", instruction: str = DEFAULT_INSTRUCTION, timeout: float = 5.0,
                 memory_mb: int = 1024, max_tests: int = 0, total_timeout: float = 0.0, **params):
        super().__init__(system_prompt=system_prompt, **params)
        if timeout <= 0:
            raise ValueError(f"task code: timeout must be > 0 seconds, got {timeout}")
        if memory_mb < 64:
            raise ValueError(f"task code: memory_mb must be >= 64, got {memory_mb}")
        if max_tests < 0:
            raise ValueError(f"task code: max_tests must be >= 0 (0: all), got {max_tests}")
        self.instruction, self.timeout, self.memory_mb = instruction, float(timeout), int(memory_mb)
        self.max_tests, self.total_timeout = int(max_tests), float(total_timeout)

    def build_prompt(self, sample: Sample) -> list[dict]:
        msgs = super().build_prompt(sample)
        if self.instruction and isinstance(sample.prompt, str):
            msgs[-1]["content"] = f"{msgs[-1]['content']}\n\n{self.instruction}"
        return msgs

    def reward(self, response: str, sample: Sample) -> float:
        code = extract_code(response)
        if not code or not code.strip():
            return 0.0
        mode, tests, setup = parse_tests(sample.answer)
        if self.max_tests:
            tests = tests[: self.max_tests]
        if not tests:
            raise ValueError(f"code task: sample {sample.id} has no tests")
        kw = dict(timeout=self.timeout, memory_mb=self.memory_mb, total_timeout=self.total_timeout or None)
        res = run_tests(code, tests, setup=setup, **kw) if mode == "assert" else run_io_tests(code, tests, **kw)
        return res.fraction
