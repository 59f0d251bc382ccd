"""Chat-format data files (thinkrl.data.files): SFT conversations in JSONL, Parquet and a datasets directory,
generation files with a torn last line, and the one-line errors for bad rows."""
import json

import pytest

from thinkrl.data.datasets import DataError
from thinkrl.data.files import load_conversations, read_generations, read_jsonl_rows

CHAT = [{"messages": [{"role": "user", "content": "1+2"}, {"role": "assistant", "content": "\\boxed{3}"}]},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "2+2"},
                      {"role": "assistant", "content": "\\boxed{4}"}]}]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_messages_and_prompt_response_rows(tmp_path):
    convs = load_conversations(_jsonl(tmp_path / "c.jsonl", CHAT))
    assert [w for w, _ in convs] == [f"{tmp_path / 'c.jsonl'}:1", f"{tmp_path / 'c.jsonl'}:2"]
    assert [m for _, m in convs] == [r["messages"] for r in CHAT]
    pr = load_conversations(_jsonl(tmp_path / "p.jsonl", [{"q": "1+2", "a": "3"}]), prompt_field="q", response_field="a")
    assert pr[0][1] == [{"role": "user", "content": "1+2"}, {"role": "assistant", "content": "3"}]


def test_parquet_and_a_datasets_directory_read_like_jsonl(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(CHAT)
    ds.to_parquet(str(tmp_path / "c.parquet"))
    ds.save_to_disk(str(tmp_path / "dir"))
    for src in (tmp_path / "c.parquet", tmp_path / "dir"):
        assert [m for _, m in load_conversations(src)] == [r["messages"] for r in CHAT]


@pytest.mark.parametrize("rows, where, what", [
    ([{"text": "x"}], ":1", "field 'messages' missing (or 'prompt' + 'response')"),
    ([CHAT[0], {"prompt": "x", "response": "y"}], ":2", "field 'messages' missing"),
    ([{"prompt": "x", "response": "y"}, {"prompt": "x"}], ":2", "field 'response' missing"),
    ([{"messages": [{"role": "user", "content": "x"}]}], ":1", "no assistant message"),
    ([{"messages": [{"role": "bot", "content": "x"}]}], ":1", "'messages.0.role' is 'bot'"),
    ([{"messages": [{"role": "user", "content": 3}]}], ":1", "'messages.0' must be an object with a string 'content'"),
    ([{"messages": []}], ":1", "non-empty list"),
])
def test_bad_rows_are_one_line_naming_the_line_and_field(tmp_path, rows, where, what):
    p = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as e:
        load_conversations(p)
    assert str(e.value).startswith(f"{p}{where}: ") and what in str(e.value) and "\n" not in str(e.value)


def test_an_empty_file_is_one_line(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        load_conversations(tmp_path / "e.jsonl")


GEN = {"id": "a", "sample": 0, "messages": CHAT[0]["messages"], "reward": 1.0, "model": "m"}


def test_a_torn_last_line_is_dropped_with_a_warning_and_repaired(tmp_path, caplog):
    p = tmp_path / "g.jsonl"
    p.write_text(json.dumps(GEN) + "\n" + json.dumps({**GEN, "sample": 1})[:20])
    with caplog.at_level("WARNING", logger="thinkrl"):
        assert [r["sample"] for _, r in read_jsonl_rows(p)] == [0]
    assert f"{p}:2: a partly written last line" in caplog.text
    assert len(p.read_text().splitlines()) == 2  # reading alone leaves the file as it is
    read_jsonl_rows(p, repair=True)
    assert p.read_text() == json.dumps(GEN) + "\n"  # cut back to the last complete line


def test_generation_rows_are_checked(tmp_path):
    p = _jsonl(tmp_path / "g.jsonl", [GEN, {**GEN, "sample": 1, "reward": None}])
    assert [(r["id"], r["sample"], r["reward"]) for r in read_generations(p)] == [("a", 0, 1.0), ("a", 1, None)]
    for bad, what in [({k: v for k, v in GEN.items() if k != "model"}, "field 'model' missing"),
                      (GEN, "id 'a' sample 0 again"),
                      ({**GEN, "sample": 2, "messages": CHAT[0]["messages"][:1]}, "no assistant message"),
                      ({**GEN, "sample": 3, "reward": "high"}, "'reward' must be a number or null")]:
        q = _jsonl(tmp_path / "bad.jsonl", [GEN, bad])
        with pytest.raises(DataError) as e:
            read_generations(q)
        assert str(e.value).startswith(f"{q}:2: ") and what in str(e.value)
    with pytest.raises(DataError, match="not found"):
        read_generations(tmp_path / "missing.jsonl")
