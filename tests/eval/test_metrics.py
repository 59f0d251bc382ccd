"""The evaluation figures: the unbiased pass@k estimator, majority voting (ties), lengths and cost, by hand."""
from __future__ import annotations

from itertools import combinations

import pytest

from thinkrl.eval.metrics import ProblemResult, majority_vote, pass_at_k, summarize


@pytest.mark.parametrize("n, c, k, expected", [
    (4, 0, 1, 0.0), (4, 4, 3, 1.0), (4, 1, 1, 1 / 4), (4, 1, 2, 1 / 2), (4, 2, 2, 5 / 6),
    (5, 2, 3, 1 - 1 / 10), (10, 3, 1, 0.3), (3, 1, 3, 1.0), (6, 1, 4, 2 / 3),
])
def test_pass_at_k_hand_values(n, c, k, expected):
    # 1 - C(n-c, k) / C(n, k): e.g. n=4, c=2, k=2: 1 - C(2,2)/C(4,2) = 1 - 1/6
    assert pass_at_k(n, c, k) == pytest.approx(expected)


@pytest.mark.parametrize("n, c, k", [(5, 2, 2), (6, 3, 4), (4, 1, 3), (7, 0, 2)])
def test_pass_at_k_is_the_fraction_of_k_subsets_with_a_correct_answer(n, c, k):
    samples = [True] * c + [False] * (n - c)
    subsets = list(combinations(samples, k))
    assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_pass_at_k_refuses_impossible_counts():
    for n, c, k in [(4, 5, 1), (4, 1, 5), (4, 1, 0)]:
        with pytest.raises(ValueError, match="pass_at_k"):
            pass_at_k(n, c, k)


@pytest.mark.parametrize("answers, correct, expected", [
    (["4", "5", "4"], [True, False, True], True),        # the majority is right
    (["5", "4", "5", "4", "5"], [False, True, False, True, False], False),  # the majority is wrong
    (["5", "4", "4", "5"], [False, True, True, False], False),  # a tie: the answer seen first ("5") wins
    (["4", "5", "5", "4"], [True, False, False, True], True),   # the same tie the other way round
    ([None, None, "4"], [False, False, True], True),     # no answer does not vote
    ([None, None], [False, False], False),               # nothing to vote for: wrong
])
def test_majority_vote_by_hand(answers, correct, expected):
    assert majority_vote(answers, correct) is expected


def test_summarize_by_hand():
    rows = [
        ProblemResult("a", True, 1.0, correct=[True, False, True], answers=["4", "5", "4"],
                      lengths=[10, 20, 30, 40], truncated=[False, False, False, True]),
        ProblemResult("b", False, 0.5, correct=[False, False, False], answers=["1", "2", "3"],
                      lengths=[10, 10, 10, 10], truncated=[False] * 4),
    ]
    f = summarize(rows, k=3, price_per_mtok=2.0)
    assert f["pass@1"] == 0.5 and f["reward/greedy"] == 0.75 and f["num_problems"] == 2 and f["k"] == 3
    assert f["pass@1/sampled"] == pytest.approx((2 / 3 + 0) / 2) == f["avg@3"]
    assert f["pass@2"] == pytest.approx((1 - 0 / 3 + 0) / 2)  # a: 1 - C(1,2)/C(3,2) = 1
    assert f["pass@3"] == pytest.approx(0.5)
    assert f["maj@3"] == 0.5  # a: "4" wins (right); b: a three-way tie, "1" first (wrong)
    assert f["len/mean"] == 17.5 and f["len/max"] == 40 and f["len/p50"] == 10.0 and f["truncated_frac"] == 1 / 8
    assert f["tokens_per_problem"] == 70.0 and f["cost_usd"] == pytest.approx(140 * 2.0 / 1e6)
    assert f["cost_per_problem_usd"] == pytest.approx(70 * 2.0 / 1e6)
    assert "pass@4" not in f and "maj@4" not in f


def test_greedy_only_has_no_sampled_figures():
    f = summarize([ProblemResult("a", True, 1.0, lengths=[5], truncated=[False])], k=0)
    assert f["pass@1"] == 1.0 and f["k"] == 0 and not any(k.startswith(("maj@", "avg@", "pass@1/")) for k in f)


def test_summarize_refuses_a_problem_with_the_wrong_number_of_samples():
    with pytest.raises(ValueError, match="'b' has 1 samples, expected k=2"):
        summarize([ProblemResult("a", True, 1.0, correct=[True, True], answers=["1", "1"]),
                   ProblemResult("b", True, 1.0, correct=[True], answers=["1"])], k=2)


def test_rows_round_trip():
    r = ProblemResult("a", True, 1.0, correct=[True, False], answers=["4", None], lengths=[1, 2, 3],
                      truncated=[False, True, False], greedy_answer="4")
    row = r.to_row()
    assert row["num_samples"] == 2 and row["num_correct"] == 1 and ProblemResult.from_row(row) == r
