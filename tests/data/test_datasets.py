"""Dataset loading: formats, field mapping (dotted paths), one-line errors, seeded splits."""
from __future__ import annotations

import json
import pytest

from thinkrl.config import DataConfig
from thinkrl.data.datasets import (DataError, fixture_path, get_field, load_samples, load_splits, shuffle_samples,
                                   split_samples)
from thinkrl.types import Sample


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_fields_ids_and_meta(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"q": "1+1?", "a": 2, "uid": "x1"}, "", {"q": "2+2?", "a": 4, "uid": 7}])
    s = load_samples(p, prompt_field="q", answer_field="a", id_field="uid")
    assert [(x.id, x.prompt, x.answer) for x in s] == [("x1", "1+1?", 2), ("7", "2+2?", 4)]
    assert s[1].meta["source"] == f"{p}:3" and s[1].meta["row"]["a"] == 4  # blank lines keep line numbers
    default_ids = load_samples(p, prompt_field="q", answer_field="a")
    assert [x.id for x in default_ids] == ["d-0", "d-1"]
    assert len(load_samples(p, prompt_field="q", answer_field="a", limit=1)) == 1


def test_dotted_paths_and_chat_prompts(tmp_path):
    rows = [{"meta": {"question": "hi", "sol": {"final": "5"}}, "messages": [{"role": "user", "content": "hello"}]}]
    p = write_jsonl(tmp_path / "n.jsonl", rows)
    s = load_samples(p, prompt_field="meta.question", answer_field="meta.sol.final")[0]
    assert (s.prompt, s.answer) == ("hi", "5")
    s = load_samples(p, prompt_field="messages", answer_field="")[0]
    assert s.prompt == [{"role": "user", "content": "hello"}] and s.answer is None
    assert get_field(rows[0], "messages.0.content") == "hello"
    with pytest.raises(KeyError):
        get_field(rows[0], "messages.3.content")


@pytest.mark.parametrize("rows,kw,message", [
    ([{"q": "a", "a": 1}, {"q": "b"}], {}, r"n\.jsonl:2: field 'a' missing"),
    ([{"q": "a", "a": 1}, "{not json"], {}, r"n\.jsonl:2: not valid JSON"),
    ([{"q": 5, "a": 1}], {}, r"n\.jsonl:1: field 'q' must be a string or a list"),
    ([{"q": [{"role": "user"}], "a": 1}], {}, r"field 'q' must be a string or a list"),
    ([{"q": "a", "a": 1}, [1, 2]], {}, r"n\.jsonl:2: expected a JSON object"),
    ([{"q": "a", "a": 1, "i": 1}, {"q": "b", "a": 2, "i": 1}], {"id_field": "i"}, r"n\.jsonl:2: duplicate id '1'"),
    ([{"q": "a", "a": 1}], {"id_field": "i"}, r"n\.jsonl:1: field 'i' missing"),
])
def test_malformed_rows_stop_with_one_line_errors(tmp_path, rows, kw, message):
    p = write_jsonl(tmp_path / "n.jsonl", rows)
    with pytest.raises(DataError, match=message) as e:
        load_samples(p, prompt_field="q", answer_field="a", **kw)
    assert "\n" not in str(e.value)


def test_json_list_and_file_errors(tmp_path):
    p = tmp_path / "l.json"
    p.write_text(json.dumps([{"prompt": "a", "answer": 1}, {"prompt": "b"}]))
    with pytest.raises(DataError, match=r"l\.json:\[1\]: field 'answer' missing"):
        load_samples(p)
    p.write_text(json.dumps({"data": [{"prompt": "a", "answer": 1}]}))
    assert load_samples(p)[0].answer == 1
    p.write_text(json.dumps({"prompt": "a"}))
    with pytest.raises(DataError, match="expected a JSON list"):
        load_samples(p)
    with pytest.raises(DataError, match="not found"):
        load_samples(tmp_path / "missing.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown data format '.csv'"):
        load_samples(tmp_path / "x.csv")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        load_samples(tmp_path / "empty.jsonl")


def test_parquet(tmp_path):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        (tmp_path / "d.parquet").write_bytes(b"PAR1")
        with pytest.raises(DataError, match="pyarrow"):
            load_samples(tmp_path / "d.parquet")
        return
    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "answer": 1}, {"prompt": "b", "answer": 2}]), tmp_path / "d.parquet")
    assert [s.answer for s in load_samples(tmp_path / "d.parquet")] == [1, 2]


def test_hf_dataset_directory(tmp_path):
    try:
        import datasets
    except ImportError:
        with pytest.raises(DataError, match="pip install datasets"):
            load_samples(tmp_path)
        return
    datasets.Dataset.from_list([{"prompt": "a", "answer": 1}]).save_to_disk(str(tmp_path / "ds"))
    assert load_samples(tmp_path / "ds")[0].answer == 1


def test_bundled_fixtures_load():
    gsm = load_samples(fixture_path("gsm8k_test_sample.jsonl"), prompt_field="question", answer_field="answer")
    assert len(gsm) == 100 and gsm[0].answer.endswith("#### 18")
    tc = load_samples(fixture_path("temporal_clue/val.json"), prompt_field="prompt", answer_field="solution")
    assert len(tc) == 64 and isinstance(tc[0].answer, dict)
    with pytest.raises(DataError, match="no bundled data file"):
        fixture_path("nope.jsonl")


def _samples(n):
    return [Sample(id=str(i), prompt=f"p{i}") for i in range(n)]


def test_split_and_shuffle_are_seeded_and_disjoint():
    s = _samples(50)
    train, held = split_samples(s, 0.1, seed=3)
    assert len(held) == 5 and len(train) == 45
    assert {x.id for x in train} | {x.id for x in held} == {x.id for x in s}
    assert not {x.id for x in train} & {x.id for x in held}
    assert split_samples(s, 0.1, seed=3) == (train, held)
    assert split_samples(s, 0.1, seed=4)[1] != held
    assert [x.id for x in shuffle_samples(s, 1)] == [x.id for x in shuffle_samples(s, 1)] != [x.id for x in s]
    assert len(split_samples(_samples(2), 0.01, 0)[1]) == 1  # at least one, and train keeps one
    with pytest.raises(DataError, match="at least 2"):
        split_samples(_samples(1), 0.5, 0)
    with pytest.raises(DataError, match="eval_fraction"):
        split_samples(s, 1.0, 0)


def test_load_splits_from_files_and_from_a_generator(tmp_path):
    p = write_jsonl(tmp_path / "t.jsonl", [{"prompt": f"p{i}", "answer": i} for i in range(20)])
    cfg = DataConfig(train_path=str(p), eval_fraction=0.25, shuffle=False)
    train, held = load_splits(cfg, task=None, seed=0)
    assert len(held) == 5 and [s.answer for s in train] == sorted(s.answer for s in train)  # file order kept

    class Gen:
        name, can_generate = "gen", True

        def generate(self, n, seed):
            return [Sample(id=f"{seed}-{i}", prompt=f"q{(seed + i) % 30}") for i in range(n)]

    cfg = DataConfig(num_train=20, num_eval=15)
    train, held = load_splits(cfg, Gen(), seed=0)
    assert len(train) == 20 and 0 < len(held) < 15
    assert not {s.prompt for s in train} & {s.prompt for s in held}  # no eval problem leaks into train
