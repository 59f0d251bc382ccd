"""Delta-learning pairs (thinkrl.data.delta.make_pairs) on hand-made generation rows: pairing by id and sample
order, the equal-answer rule (the task's extracted answer, else whitespace-normalised text), the verifier filter,
unmatched answers, and a prompt that differs between the two files."""
import pytest

from thinkrl.data.datasets import DataError
from thinkrl.data.delta import make_pairs, same_answer
from thinkrl.tasks.arithmetic import last_boxed


def _row(pid, sample, answer, reward, model, prompt="1+2"):
    return {"id": pid, "sample": sample, "reward": reward, "model": model, "where": f"{model}.jsonl:{sample + 1}",
            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def test_same_answer_uses_the_extracted_answer_else_normalised_text():
    assert same_answer("2+1=3 \\boxed{3}", "\\boxed{3}", last_boxed)  # same boxed answer, other working
    assert not same_answer("\\boxed{3}", "\\boxed{4}", last_boxed)
    assert same_answer("no  answer\n", " no answer", last_boxed)  # neither extracts: the text decides
    assert not same_answer("no answer", "\\boxed{no answer}", last_boxed)
    assert same_answer("\\boxed{3}", " \\boxed{3}\n", None) and not same_answer("\\boxed{3}", "3", None)


def test_pairs_keep_distinct_answers_and_count_what_they_drop():
    strong = [_row("a", 0, "\\boxed{3}", 1.0, "S"), _row("a", 1, "x \\boxed{3}", 1.0, "S"),
              _row("b", 0, "\\boxed{5}", 1.0, "S", "2+3"), _row("c", 0, "\\boxed{9}", 1.0, "S", "4+5")]
    weak = [_row("a", 1, "\\boxed{3}", 1.0, "W"), _row("a", 0, "\\boxed{4}", 0.0, "W"),  # sample order, not file order
            _row("b", 0, "\\boxed{6}", 0.0, "W", "2+3"), _row("b", 1, "\\boxed{7}", 0.0, "W", "2+3"),
            _row("d", 0, "\\boxed{1}", 0.0, "W", "0+1")]
    pairs, counts = make_pairs(strong, weak, extract=last_boxed)
    assert [(p["id"], p["sample"], p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == [
        ("a", 0, "\\boxed{3}", "\\boxed{4}"), ("b", 0, "\\boxed{5}", "\\boxed{6}")]
    assert (counts.pairs, counts.dropped_equal, counts.dropped_verifier, counts.unmatched) == (2, 1, 0, 3)
    assert pairs[0] == {"id": "a", "sample": 0, "prompt": [{"role": "user", "content": "1+2"}],
                        "chosen": [{"role": "assistant", "content": "\\boxed{3}"}],
                        "rejected": [{"role": "assistant", "content": "\\boxed{4}"}],
                        "chosen_model": "S", "rejected_model": "W", "chosen_reward": 1.0, "rejected_reward": 0.0}


def test_verified_keeps_chosen_correct_and_rejected_wrong_only():
    strong = [_row("a", 0, "\\boxed{3}", 1.0, "S"), _row("a", 1, "\\boxed{2}", 0.0, "S"), _row("a", 2, "\\boxed{3}", 1.0, "S")]
    weak = [_row("a", 0, "\\boxed{4}", 0.0, "W"), _row("a", 1, "\\boxed{4}", 0.0, "W"), _row("a", 2, "3 \\boxed{3}", 1.0, "W")]
    pairs, counts = make_pairs(strong, weak, extract=last_boxed, verified=True, threshold=1.0)
    assert [p["sample"] for p in pairs] == [0]
    assert (counts.dropped_equal, counts.dropped_verifier) == (1, 1)
    unverified, _ = make_pairs(strong, weak, extract=last_boxed)
    assert [p["sample"] for p in unverified] == [0, 1]
    no_reward = [dict(r, reward=None) for r in weak]
    with pytest.raises(DataError, match="W.jsonl:1: --verified needs rewards"):
        make_pairs(strong, no_reward, extract=last_boxed, verified=True)
    pairs, _ = make_pairs(strong, no_reward, extract=last_boxed)
    assert "rejected_reward" not in pairs[0] and pairs[0]["chosen_reward"] == 1.0


def test_a_prompt_that_differs_between_the_files_is_one_line():
    with pytest.raises(DataError) as e:
        make_pairs([_row("a", 0, "x", 1.0, "S")], [_row("a", 0, "y", 0.0, "W", prompt="9+9")])
    assert str(e.value) == "W.jsonl:1: prompt 'a' differs from the one at S.jsonl:1"
