"""Countdown: TinyZero's rule, safe evaluation, partial credit, the generator."""
from __future__ import annotations

import time
from fractions import Fraction

import pytest

from thinkrl.tasks import make_task
from thinkrl.tasks.countdown import BadExpression, evaluate, extract_expression, score
from thinkrl.types import Sample

NUMS, TARGET = [3, 5, 7, 2], 22  # 3 * 5 + 7 = 22 leaves the 2 unused


def test_extract_prefers_the_last_answer_tag_then_the_box():
    assert extract_expression("<answer>1+2</answer> then <answer> 3*4 </answer>") == "3*4"
    assert extract_expression(r"\boxed{(1+2)*3}") == "(1+2)*3"
    assert extract_expression("no answer") is None


def test_evaluate_is_exact_and_reports_numbers_used():
    assert evaluate("(1 + 2) / 3") == (Fraction(1), [1, 2, 3])
    assert evaluate("7 / 2 * 2") == (Fraction(7), [7, 2, 2])
    assert evaluate("-(3 - 5)") == (Fraction(2), [3, 5])
    assert evaluate(r"6 \times 7") == (Fraction(42), [6, 7])


@pytest.mark.parametrize("expr", [
    "__import__('os').system('true')", "abs(-3)", "x + 1", "2 ** 3", "1.5 * 2", "[1, 2]", "1 if 1 else 2",
    "3 // 2", "3 % 2", "1 / 0", "(1 + 2", "", "2 ** 10 ** 10",
])
def test_evaluate_rejects_everything_but_arithmetic(expr):
    with pytest.raises(BadExpression):
        evaluate(expr)


def test_tinyzero_rule_each_number_exactly_once():
    assert score("<answer>(7 - 5) * 3 * 2</answer>", [3, 5, 7, 2], 12) == 1.0
    assert score("<answer>3 * 5 + 7</answer>", NUMS, TARGET) == 0.0  # 2 is not used
    assert score("<answer>3 * 5 + 7 + 2 - 2</answer>", NUMS, TARGET) == 0.0  # 2 used twice
    assert score("<answer>3 * 5 + 7 + 2 - 2</answer>", NUMS, TARGET, format_score=0.1) == 0.1
    assert score("<answer>3 * 5 + 7 * 2</answer>", NUMS, 29) == 1.0
    assert score("<answer>3 * 5 + 7 * 2</answer>", NUMS, 30, format_score=0.1) == 0.1  # well formed, wrong value
    assert score("<answer>print(1)</answer>", NUMS, 30, format_score=0.1) == 0.0  # malformed: no partial credit
    assert score("the answer is 29", NUMS, 29) == 0.0
    assert score("<answer>3 * 5 + 7 * 2 = 29</answer>", NUMS, 29) == 1.0  # an equation: the left side counts


def test_huge_numbers_and_exponents_are_cheap():
    t0 = time.perf_counter()
    assert score("<answer>" + "9" * 250 + " * " + "9" * 40 + "</answer>", [9], 1) == 0.0
    assert score("<answer>2 ** 9999999999</answer>", [2, 9999999999], 4, allow_pow=True) == 0.0
    assert score("<answer>2 ** 2</answer>", [2, 2], 4, allow_pow=True) == 1.0
    assert score("<answer>" + "(" * 150 + "1" + ")" * 150 + "</answer>", [1], 1) == 0.0
    assert time.perf_counter() - t0 < 5.0  # the unguarded computations take hours; a loaded CI machine is slow


def test_generated_instances_are_solvable_and_task_rewards():
    task = make_task("countdown", {"num_numbers": 3, "max_number": 20, "format_score": 0.1})
    samples = task.generate(20, seed=0)
    assert len({s.id for s in samples}) == 20
    for s in samples:
        nums, target = s.answer["numbers"], s.answer["target"]
        assert len(nums) == 3 and all(1 <= x <= 20 for x in nums) and 1 <= target <= 100
        assert str(target) in s.prompt and str(nums) in s.prompt
        assert task.reward(task.demonstration(s), s) == 1.0  # the generator's own solution
        assert task.reward("<answer>" + " + ".join(map(str, nums)) + " + 1000</answer>", s) == 0.1
    assert task.generate(5, seed=0)[0].answer == samples[0].answer  # deterministic
    assert task.generate(5, seed=1)[0].answer != samples[0].answer


def test_samples_from_files_use_nums_and_target_fields():
    task = make_task("countdown")
    s = Sample(id="r1", prompt="", meta={"row": {"nums": [4, 6], "target": 24}})
    assert "[4, 6]" in task.build_prompt(s)[-1]["content"]
    assert task.reward("<answer>4*6</answer>", s) == 1.0
    with pytest.raises(ValueError, match="target"):
        task.reward("<answer>4*6</answer>", Sample(id="r2", prompt="", answer={"nums": [4, 6]}))
    with pytest.raises(ValueError, match="num_numbers"):
        make_task("countdown", {"num_numbers": 1})
    with pytest.raises(ValueError, match="colour"):
        make_task("countdown", {"colour": 1})
