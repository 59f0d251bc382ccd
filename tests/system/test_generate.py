"""`thinkrl generate` (K answers per prompt, kept by the verifier, resumable) and `thinkrl pairs` on the micro model.

The task `gen_tasks:EvenLength` (beside this file) scores an answer 1 when its length is even, so a fresh model's
answers are about half correct."""
import json

import pytest

from thinkrl.cli import main
from thinkrl.config import load_config
from thinkrl.models.micro import build_micro_model, build_tokenizer
from thinkrl.system.generate import generate, make_pair_file

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
        "model.intermediate_size=64", "data.num_train=6", "data.num_eval=4", "log.progress=false", "run.threads=1",
        "rollout.max_new_tokens=8", "task.name=gen_tasks:EvenLength"]


def _cfg(*extra):
    return load_config(None, [*TINY, *extra])


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_keep_correct_writes_the_verified_answers_in_the_chat_format(tmp_path):
    out = tmp_path / "gen.jsonl"
    counts = generate(_cfg(), "micro", out, samples=4, batch_size=4, echo=lambda *_: None)
    rows = _rows(out)
    assert counts == {"prompts": 6, "skipped": 0, "answers": 24, "kept": len(rows)} and 0 < len(rows) < 24
    for r in rows:
        assert set(r) == {"id", "sample", "messages", "reward", "model"} and r["model"] == "micro"
        assert r["messages"][0]["role"] == "user" and r["messages"][-1]["role"] == "assistant"
        assert r["reward"] == 1.0 and len(r["messages"][-1]["content"]) % 2 == 0 and 0 <= r["sample"] < 4
    assert len({(r["id"], r["sample"]) for r in rows}) == len(rows)
    every = tmp_path / "all.jsonl"
    generate(_cfg(), "micro", every, samples=4, keep="all", batch_size=4, echo=lambda *_: None)
    all_rows = _rows(every)
    assert len(all_rows) == 24 and {r["reward"] for r in all_rows} == {0.0, 1.0}
    assert [r for r in all_rows if r["reward"] == 1.0] == rows  # the same answers: seeded by (run.seed, prompt id)
    assert all(r["reward"] == float(len(r["messages"][-1]["content"]) % 2 == 0) for r in all_rows)


def test_a_rerun_after_a_kill_skips_the_done_prompts_and_ends_with_the_uninterrupted_file(tmp_path, caplog):
    straight, killed = tmp_path / "straight.jsonl", tmp_path / "killed.jsonl"
    generate(_cfg(), "micro", straight, samples=3, keep="all", batch_size=2, echo=lambda *_: None)
    lines = straight.read_text().splitlines(keepends=True)
    ids = [json.loads(x) for x in (tmp_path / "straight.jsonl.done").read_text().splitlines()]
    done = set(ids[:2])
    # killed in the third batch: two prompts marked done, rows of the third prompt written but not marked, the
    # last row cut mid-line, and the done file's last id cut too
    first = [x for x in lines if json.loads(x)["id"] in done]
    third = [x for x in lines if json.loads(x)["id"] == ids[2]]
    killed.write_text("".join(first + third[:2]) + third[2][:25])
    (tmp_path / "killed.jsonl.done").write_text("".join(json.dumps(i) + "\n" for i in ids[:2]) + '"' + ids[2][:1])
    with caplog.at_level("WARNING", logger="thinkrl"):
        counts = generate(_cfg(), "micro", killed, samples=3, keep="all", batch_size=2, echo=lambda *_: None)
    assert counts["skipped"] == 2 and counts["answers"] == 12
    assert "partly written last line" in caplog.text and "2 rows of prompts not marked done removed" in caplog.text
    assert killed.read_text() == straight.read_text()
    assert (tmp_path / "killed.jsonl.done").read_text() == (tmp_path / "straight.jsonl.done").read_text()
    again = generate(_cfg(), "micro", killed, samples=3, keep="all", echo=lambda *_: None)  # nothing left to do
    assert again["skipped"] == 6 and killed.read_text() == straight.read_text()


def test_no_verifier_writes_null_rewards_and_refuses_keep_correct(tmp_path, capsys):
    out = tmp_path / "u.jsonl"
    generate(_cfg("task.name=gen_tasks:Unscored"), "micro", out, samples=2, echo=lambda *_: None)
    assert [r["reward"] for r in _rows(out)] == [None] * 12
    args = ["generate", *TINY, "task.name=gen_tasks:Unscored", "--model", "micro", "-o", str(tmp_path / "x.jsonl"),
            "--keep", "correct"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == "thinkrl generate: error: --keep correct: task 'gen_tasks:Unscored' has no verifier (reward); use --keep all"


def test_prompts_from_a_data_file_and_a_resume_with_another_model_is_one_line(tmp_path, capsys):
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"{i}+1", "answer": i + 1}) + "\n" for i in range(3)))
    out = tmp_path / "g.jsonl"
    generate(_cfg("data.id_field=id"), "micro", out, samples=1, keep="all", data=str(data), echo=lambda *_: None)
    assert [(r["id"], r["messages"][0]["content"]) for r in _rows(out)] == [("q0", "0+1"), ("q1", "1+1"), ("q2", "2+1")]
    model_dir = tmp_path / "m"
    _save_micro(model_dir, seed=1)
    capsys.readouterr()
    args = ["generate", *TINY, "data.id_field=id", "--model", str(model_dir), "-o", str(out), "--data", str(data)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"thinkrl generate: error: {out}:1: written by model 'micro', not '{model_dir}'; give another --output"
    assert main(["generate", *TINY, "--model", "micro", "-o", str(out), "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "--data" in capsys.readouterr().err


def _save_micro(path, seed):
    tok = build_tokenizer()
    model = build_micro_model(tok, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
                              seed=seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)


def test_pairs_from_two_models_end_to_end(tmp_path, capsys):
    strong, weak = tmp_path / "strong", tmp_path / "weak"
    _save_micro(strong, seed=1)
    _save_micro(weak, seed=2)
    out = tmp_path / "pairs.jsonl"
    capsys.readouterr()
    assert main(["pairs", *TINY, "--chosen-model", str(strong), "--rejected-model", str(weak), "-k", "2",
                 "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = _rows(out)
    assert f"pairs: {len(rows)} pairs; dropped: 0 with equal answers, 0 by the verifier; 0 answers without a " \
           f"counterpart -> {out}" in printed and len(rows) == 12
    chosen = {(r["id"], r["sample"]): r for r in _rows(tmp_path / "pairs.chosen.jsonl")}
    for p in rows:
        c = chosen[(p["id"], p["sample"])]
        assert p["prompt"] == c["messages"][:-1] and p["chosen"] == c["messages"][-1:]
        assert p["chosen_model"] == str(strong) and p["rejected_model"] == str(weak)
        assert p["chosen_reward"] == c["reward"] and p["rejected_reward"] in (0.0, 1.0)
    # the same model on both sides: every pair has equal answers, nothing to write
    assert main(["pairs", *TINY, "--chosen", str(tmp_path / "pairs.chosen.jsonl"),
                 "--rejected", str(tmp_path / "pairs.chosen.jsonl"), "-o", str(tmp_path / "e.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("thinkrl pairs: error: no pairs left to write (0 pairs; dropped: 12 with equal answers, 0 by the "
                   "verifier; 0 answers without a counterpart)")
    assert main(["pairs", *TINY, "--chosen", str(out), "-o", str(tmp_path / "f.jsonl")]) == 2
    assert "give one of --rejected FILE or --rejected-model MODEL" in capsys.readouterr().err


def test_make_pair_file_needs_one_source_per_side(tmp_path):
    with pytest.raises(ValueError, match="give one of --chosen FILE or --chosen-model MODEL"):
        make_pair_file(_cfg(), tmp_path / "p.jsonl", chosen="a.jsonl", chosen_model="micro", rejected="b.jsonl")


def test_remote_servers_answer_as_the_same_model_does_locally(tmp_path):
    from thinkrl.rollout.hf import HFEngine
    from thinkrl.rollout.server import Server

    model_dir = tmp_path / "m"
    _save_micro(model_dir, seed=3)
    from thinkrl.models.loading import load_checkpoint

    model, tok = load_checkpoint(str(model_dir))
    model.eval()
    engine = HFEngine(model, tok)
    server = Server(engine, tok, model=model, port=0)
    port = server.start()
    greedy = ["rollout.temperature=0"]
    try:
        generate(_cfg(*greedy, "rollout.engine=remote", f"rollout.servers=['http://127.0.0.1:{port}']"), str(model_dir),
                 tmp_path / "remote.jsonl", samples=1, keep="all", echo=lambda *_: None)
    finally:
        server.stop()
    generate(_cfg(*greedy), str(model_dir), tmp_path / "local.jsonl", samples=1, keep="all", echo=lambda *_: None)
    remote, local = _rows(tmp_path / "remote.jsonl"), _rows(tmp_path / "local.jsonl")
    assert len(remote) == 6 and [r["messages"] for r in remote] == [r["messages"] for r in local]
