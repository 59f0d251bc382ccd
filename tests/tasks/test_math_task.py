"""Math task: box extraction, math-verify equivalences, GSM8K/MATH loaders, adversarial answers, threads."""
from __future__ import annotations

import threading
import time

import pytest

from thinkrl.data.datasets import fixture_path
from thinkrl.tasks import make_task
from thinkrl.tasks import math as mt
from thinkrl.types import Sample


def S(answer, prompt="q") -> Sample:
    return Sample(id="x", prompt=prompt, answer=answer)


def test_last_boxed_handles_nesting_and_picks_the_last_closed_box():
    assert mt.last_boxed(r"so \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert mt.last_boxed(r"\boxed{1} then \boxed{ {a}^{ {b} } }") == "{a}^{ {b} }"
    assert mt.last_boxed(r"\boxed{3} and an unclosed \boxed{4") == "3"
    assert mt.last_boxed("no box") is None
    assert mt.last_boxed(r"\fbox{7}") == "7"


@pytest.mark.parametrize("response,gold", [
    (r"\boxed{0.5}", r"\frac{1}{2}"),
    (r"\boxed{\frac{1}{2}}", "0.5"),
    (r"\boxed{1/2}", "0.5"),
    (r"\boxed{50\%}", "0.5"),
    (r"\boxed{70,000}", "70000"),
    (r"\boxed{[1,2)}", "[1,2)"),
    (r"\boxed{\{2, 1\}}", r"\{1,2\}"),
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"\boxed{x^2+2x+1}", r"(x+1)^2"),
    (r"work... \boxed{18}", "Janet sells 9 eggs.\n#### 18"),  # a GSM8K answer field as gold
])
def test_equivalent_answers_score_one(response, gold):
    assert make_task("math").reward(response, S(gold)) == 1.0


@pytest.mark.parametrize("response,gold", [
    (r"\boxed{17}", "18"),
    (r"\boxed{[1,2]}", "[1,2)"),
    (r"\boxed{\{1,3\}}", r"\{1,2\}"),
    (r"\boxed{x^2+1}", r"(x+1)^2"),
    ("18", "18"),  # no box: the task requires one
    (r"\boxed{}", "0"),
    (r"\boxed{18", "18"),  # unclosed
])
def test_wrong_or_malformed_answers_score_zero(response, gold):
    assert make_task("math").reward(response, S(gold)) == 0.0


def test_answer_regex_param_and_prompt_instruction():
    task = make_task("math", {"answer_regex": r"Answer:\s*(.+)"})
    assert task.reward("Answer: 3\nAnswer: 0.5", S("1/2")) == 1.0
    assert task.reward(r"\boxed{0.5}", S("1/2")) == 0.0  # the regex replaces the box
    msgs = make_task("math").build_prompt(S("1", prompt="What is 1?"))
    assert msgs[-1]["content"].startswith("What is 1?") and "\\boxed{}" in msgs[-1]["content"]


def test_bad_params_are_named():
    with pytest.raises(ValueError, match="bogus"):
        make_task("math", {"bogus": 1})
    with pytest.raises(ValueError, match="answer_regex"):
        make_task("math", {"answer_regex": "("})


def test_public_verify_takes_whole_responses_and_bare_answers():
    assert mt.verify("The answer is 18.", "18")
    assert mt.verify(r"so $x \in [1,2)$", "[1,2)")
    assert mt.verify("[1, 2)", "[1,2)")  # bare interval
    assert mt.verify(r"\frac{1}{2}", "0.5")
    assert mt.verify("Cases (a (b (c (d (e (f (g (h (i (j (k (l are left open.\nThe answer is 18.", "18")  # prose
    assert not mt.verify("The answer is 17.", "18")
    assert not mt.verify("", "18")


@pytest.mark.parametrize("bad", [
    r"\boxed{9^{9^{9}}}",  # would compute a 370-million-digit number inside one C call
    r"\boxed{(10^{9})!}",
    r"\boxed{2^{2^{40}}}",
    r"\boxed{" + "{" * 200 + "1" + "}" * 200 + "}",  # deep nesting
    r"\boxed{" + "1+" * 5000 + "1}",  # over-long
])
def test_adversarial_answers_score_zero_quickly(bad):
    t0 = time.perf_counter()
    assert make_task("math").reward(bad, S("18")) == 0.0
    assert time.perf_counter() - t0 < 3.0


def test_verify_works_in_worker_threads_and_times_out_there(monkeypatch):
    out = []
    th = threading.Thread(target=lambda: out.append(mt.verify(r"\boxed{\frac{1}{2}}", "0.5")))
    th.start()
    th.join()
    assert out == [True]  # math-verify's own signal-based timeout would raise outside the main thread

    def slow(prediction, gold):  # stands in for a parse that never ends
        n = 0
        while n >= 0:
            n += 1

    monkeypatch.setattr(mt, "_verify_now", slow)
    out.clear()
    t0 = time.perf_counter()
    th = threading.Thread(target=lambda: out.append(mt.verify("1", "1", timeout=0.3)))
    th.start()
    th.join(timeout=10)
    assert out == [False] and time.perf_counter() - t0 < 3.0


def test_math500_fixture_solutions_verify_and_shifted_ones_do_not():
    samples = mt.load_math(fixture_path("math500_sample.jsonl"), limit=25)
    assert samples[0].id == "test/precalculus/807.json"
    task = make_task("math")
    rows = [s.meta["row"] for s in samples]
    assert all(task.reward(r["solution"], s) == 1.0 for r, s in zip(rows, samples))
    shifted = sum(task.reward(rows[i]["solution"], samples[i - 1]) for i in range(1, len(samples)))
    assert shifted <= 2  # a few answers may coincide


def test_gsm8k_loader_keeps_the_final_answer():
    samples = mt.load_gsm8k(fixture_path("gsm8k_test_sample.jsonl"), limit=3)
    assert [s.answer for s in samples] == ["18", "3", "70000"]
    assert samples[0].prompt.startswith("Janet")
    assert "####" in samples[0].meta["solution"]
    task = make_task("math")
    assert task.reward(r"she makes \boxed{18} dollars", samples[0]) == 1.0
    assert task.reward(task.demonstration(samples[2]), samples[2]) == 1.0
