"""The public math sets in their published formats (data.format), detected by fields or named, with bad rows
refused in one line naming file:line and the field."""
from __future__ import annotations

import json

import pytest

from thinkrl.config import ConfigError, DataConfig, load_config
from thinkrl.data.datasets import DataError, fixture_path
from thinkrl.data.formats import load_formatted


def cfg(**kw) -> DataConfig:
    return DataConfig(**kw)


def write(tmp_path, rows, name="x.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_gsm8k_fixture_is_detected_and_its_gold_answer_is_the_number_after_the_marks():
    samples = load_formatted(fixture_path("gsm8k_test_sample.jsonl"), cfg())
    assert len(samples) == 100
    s = samples[0]
    assert s.prompt.startswith("Janet") and s.answer == "18" and s.meta["solution"].endswith("#### 18")
    assert load_formatted(fixture_path("gsm8k_test_sample.jsonl"), cfg(format="gsm8k"))[0].answer == "18"


def test_math500_fixture_keeps_its_ids_and_latex_answers():
    samples = load_formatted(fixture_path("math500_sample.jsonl"), cfg(format="math500"))
    assert len(samples) == 100 and samples[0].id == "test/precalculus/807.json"
    assert samples[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)" and samples[0].prompt.startswith("Convert")
    assert [s.id for s in load_formatted(fixture_path("math500_sample.jsonl"), cfg())] == [s.id for s in samples]


def test_aime_rows_as_the_public_exports_write_them(tmp_path):
    lower = write(tmp_path, [{"id": 60, "problem": "Find x.", "answer": 204}, {"id": 61, "problem": "y?", "answer": "25"}])
    caps = write(tmp_path, [{"ID": "2024-I-1", "Problem": "Find x.", "Solution": "...", "Answer": 204}], "caps.jsonl")
    a = load_formatted(lower, cfg(format="aime"))
    assert [(s.id, s.prompt, s.answer) for s in a] == [("60", "Find x.", "204"), ("61", "y?", "25")]
    [c] = load_formatted(caps, cfg())
    assert (c.id, c.prompt, c.answer) == ("2024-I-1", "Find x.", "204")


def test_the_field_mapping_wins_when_the_file_has_the_prompt_field(tmp_path):
    p = write(tmp_path, [{"prompt": "2+2", "answer": "4", "question": "ignored"}])
    [s] = load_formatted(p, cfg())
    assert (s.prompt, s.answer) == ("2+2", "4")


@pytest.mark.parametrize("rows, fmt, message", [
    ([{"question": "q", "answer": "4"}, {"question": "q2", "answer": "no marks"}], "gsm8k",
     r"x.jsonl:1: field 'answer' has no '#### <answer>' \(GSM8K format\)"),
    ([{"problem": "p", "answer": 1}, {"problem": "p2", "answer": ""}], "aime", r"x.jsonl:2: field 'answer' is empty"),
    ([{"problem": "p", "answer": 1}, {"problem": "p2"}], "aime", r"x.jsonl:2: field 'answer' missing"),
    ([{"text": "p"}], "auto", r"x.jsonl:1: fields text match no known format"),
    ([{"question": "q", "answer": "#### 4"}], "math500", r"x.jsonl:1: data.format=math500 but the row's fields are gsm8k's"),
])
def test_bad_rows_name_the_file_line_and_field(tmp_path, rows, fmt, message):
    with pytest.raises(DataError, match=message):
        load_formatted(write(tmp_path, rows), cfg(format=fmt))


def test_training_reads_a_named_format_and_an_unknown_one_fails_at_load(tmp_path):
    c = load_config(None, ["task.name=math", f"data.train_path={fixture_path('gsm8k_test_sample.jsonl')}",
                           "data.format=gsm8k", "data.num_eval=5"])
    from thinkrl.data import load_task_data
    from thinkrl.tasks import make_task

    train, ev = load_task_data(c, make_task("math"))
    assert len(train) + len(ev) >= 95 and all(s.answer.replace(",", "").lstrip("-").isdigit() for s in train + ev)
    with pytest.raises(ConfigError, match="data.format: unknown value 'gsm9k'; valid: aime, auto, gsm8k, math500"):
        load_config(None, ["data.format=gsm9k"])
