"""`thinkrl filter`: pass-rate counting, the keep range, output rows, histogram, errors.

A scripted engine gives every prompt a known number of correct answers (hand-computable from the
problem), so the kept set and the histogram are checked exactly; a tiny micro model (and a saved
checkpoint directory) runs the same command through the real engine for the mechanics.
"""
from __future__ import annotations

import asyncio
import json
import re

import pytest

import thinkrl.system.setup as setup
from thinkrl.cli import main as cli_main
from thinkrl.tools.filter import count_correct, format_histogram, hist_path_for, histogram, in_range, main, parse_keep
from thinkrl.tasks import make_task
from thinkrl.types import Generation

TINY = ["model.hidden_size=16", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
        "model.intermediate_size=32", "rollout.max_new_tokens=6", "run.threads=1"]


def test_parse_keep():
    assert parse_keep("0.2:0.625") == (0.2, 0.625)
    assert parse_keep("0:1") == (0.0, 1.0) and parse_keep("0.5:0.5") == (0.5, 0.5)
    for bad in ["0.2", "a:b", "0.2:0.5:0.7", "0.7:0.2", "-0.1:0.5", "0.5:1.5", ""]:
        with pytest.raises(ValueError, match="--keep"):
            parse_keep(bad)


def test_range_and_histogram():
    # k=8, keep [0.2, 0.625]: 2/8=0.25 .. 5/8=0.625 are in; 1/8=0.125 and 6/8=0.75 are out
    assert [c for c in range(9) if in_range(c, 8, 0.2, 0.625)] == [2, 3, 4, 5]
    assert [c for c in range(6) if in_range(c, 5, 0.2, 0.6)] == [1, 2, 3]  # both ends included
    assert histogram([0, 3, 3, 8, 5], 8) == [1, 0, 0, 2, 0, 1, 0, 0, 1]
    with pytest.raises(ValueError):
        histogram([9], 8)
    text = format_histogram([1, 0, 2], 0.5, 1.0)
    assert "k=2, 3 prompts, 2 kept" in text


def gen(tok, text):
    toks = tok(text, add_special_tokens=False)["input_ids"]
    return Generation(toks, [0.0] * len(toks), [0] * len(toks), "stop")


class ScriptedEngine:
    """For prompt 'a+b': c = (a+b) % (k+1) correct answers out of k. Counts its calls and the most in flight."""

    def __init__(self, tok):
        self.tok, self.calls, self.inflight, self.max_inflight = tok, 0, 0, 0

    async def generate(self, prompt, params, n):
        self.calls += 1
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        await asyncio.sleep(0)  # let the other episodes of the batch start
        self.inflight -= 1
        a, b = map(int, re.search(r"(\d+)\+(\d+)", self.tok.decode(prompt)).groups())
        c = (a + b) % (n + 1)
        texts = [f"\\boxed{{{a + b}}}"] * c + ["\\boxed{-1}"] * (n - c)
        return [gen(self.tok, t) for t in texts]

    def close(self):
        self.closed = True


@pytest.fixture
def scripted(monkeypatch):
    engines = []

    def make(cfg, model, tok, version=0):
        engines.append(ScriptedEngine(tok))
        return engines[-1]

    monkeypatch.setattr(setup, "make_inference_engine", make)
    return engines


def test_kept_set_and_histogram_are_exact(tmp_path, scripted, capsys):
    out = tmp_path / "kept.jsonl"
    k, n = 8, 40
    rc = main(["--model", "micro", "--task", "arithmetic", "--data", f"generated:{n}", "--k", str(k), "--keep", "0.2:0.625",
               "--out", str(out), "--batch-size", "16", "-q", "run.seed=3", *TINY])
    assert rc == 0 and scripted[0].calls == 40 and scripted[0].closed
    assert scripted[0].max_inflight == 16  # 40 prompts in batches of 16
    samples = make_task("arithmetic").generate(n, seed=3)
    want_c = [s.answer % (k + 1) for s in samples]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    expect = [(s.id, c / k) for s, c in zip(samples, want_c) if 2 <= c <= 5]
    assert [(r["id"], r["pass_rate"]) for r in rows] == expect and len(expect) > 0
    assert all(r["prompt"] == f"{r['meta']['a']}+{r['meta']['b']}" and r["answer"] == r["meta"]["a"] + r["meta"]["b"] for r in rows)
    hist = json.loads(hist_path_for(out).read_text())
    assert hist["counts"] == [want_c.count(c) for c in range(k + 1)] and sum(hist["counts"]) == n
    assert hist["n_kept"] == len(rows) == sum(b["count"] for b in hist["bins"] if b["kept"])
    assert [b["correct"] for b in hist["bins"] if b["kept"]] == [2, 3, 4, 5]
    assert hist["mean_pass_rate"] == pytest.approx(sum(want_c) / (k * n))
    shown = capsys.readouterr().out
    assert f"k=8, {n} prompts, {len(rows)} kept" in shown and f"wrote {len(rows)} rows" in shown


def test_file_rows_keep_their_fields(tmp_path, scripted):
    data = tmp_path / "d.jsonl"
    items = [(3, 4), (1, 1), (9, 9), (0, 5)]  # sums 7, 2, 18, 5 -> with k=4: c = 2, 2, 3, 0
    data.write_text("".join(json.dumps({"question": f"{a}+{b}", "gold": a + b, "src": f"row{i}"}) + "\n"
                            for i, (a, b) in enumerate(items)))
    out = tmp_path / "sub" / "kept.jsonl"
    main(["--model", "micro", "--task", "arithmetic", "--data", str(data), "--k", "4", "--keep", "0.5:0.75", "--out", str(out),
          "-q", "data.prompt_field=question", "data.answer_field=gold", *TINY])
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows == [{"question": "3+4", "gold": 7, "src": "row0", "pass_rate": 0.5},
                    {"question": "1+1", "gold": 2, "src": "row1", "pass_rate": 0.5},
                    {"question": "9+9", "gold": 18, "src": "row2", "pass_rate": 0.75}]


def test_threshold_comes_from_the_config(tmp_path, scripted):
    # the scripted answers have reward 1.0 or 0.0: above a threshold of 1.5 nothing is correct
    out = tmp_path / "kept.jsonl"
    main(["--model", "micro", "--task", "arithmetic", "--data", "generated:6", "--k", "4", "--keep", "0:1", "--out", str(out),
          "-q", "algo.correct_threshold=1.5", *TINY])
    assert json.loads(hist_path_for(out).read_text())["counts"] == [6, 0, 0, 0, 0]


class ToolEngine:
    """Calls the calculator on the question, then boxes the tool's result: right only when tools run."""

    def __init__(self, tok):
        self.tok, self.params = tok, []

    async def generate(self, prompt, params, n):
        self.params.append(params)
        context = self.tok.decode(prompt, skip_special_tokens=False)
        m = re.search(r"<result>([^<]*)</result>$", context)
        text = f" \\boxed{{{m.group(1)}}}<|end|>" if m else "<calc>" + re.findall(r"What is (.+?)\?", context)[-1] + "</calc>"
        return [gen(self.tok, text) for _ in range(n)]

    def close(self):
        pass


def test_tool_task_is_filtered_with_its_tools(tmp_path, monkeypatch):
    engines = []
    monkeypatch.setattr(setup, "make_inference_engine", lambda cfg, model, tok, version=0: engines.append(ToolEngine(tok)) or engines[-1])
    out = tmp_path / "kept.jsonl"
    main(["--model", "micro", "--task", "calculator", "--data", "generated:5", "--k", "3", "--keep", "1:1", "--out", str(out),
          "-q", *TINY, "rollout.max_new_tokens=64"])
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 5 and all(r["pass_rate"] == 1.0 for r in rows)  # without the tool loop every answer is wrong
    assert all("</calc>" in p.stop for p in engines[0].params)


def test_count_correct_runs_the_workflow_at_the_threshold(tok):
    from thinkrl.rollout.workflow import SingleTurnWorkflow
    from thinkrl.tasks.base import Task
    from thinkrl.types import Sample, SamplingParams

    class Graded(Task):
        def reward(self, response, sample):
            return {"full": 1.0, "half": 0.5}.get(response.strip(), 0.0)

    class Engine:
        async def generate(self, prompt, params, n):  # sample j answers 'full' for j < 1, else 'half'
            return [gen(tok, "full" if j < 1 else "half") for j in range(n)]

    params = SamplingParams(max_new_tokens=8)
    wf = SingleTurnWorkflow(Graded(), tok, params, 1)
    samples = [Sample(id=str(i), prompt="q") for i in range(3)]
    assert count_correct(Engine(), wf, samples, 4, params, 0.5, batch_size=2) == [4, 4, 4]
    assert count_correct(Engine(), wf, samples, 4, params, 1.0, batch_size=2) == [1, 1, 1]


@pytest.mark.parametrize("args, msg", [
    (["--keep", "0.7:0.2"], "--keep: need 0 <= LO <= HI <= 1"),
    (["--keep", "half"], "--keep: expected LO:HI"),
    (["--data", "missing.jsonl"], "--data: file not found: missing.jsonl"),
    (["--data", "generated:0"], "expected generated:N"),
    (["--k", "0"], "--k: must be >= 1"),
    (["--task", "math"], "task 'math' has no generator"),
    (["--model", "no-such-model"], "not a directory and not a known model name"),
    (["--task", "nope"], "task.name: unknown value 'nope'"),
])
def test_errors_are_one_line(tmp_path, scripted, capsys, args, msg):
    base = {"--model": "micro", "--task": "arithmetic", "--data": "generated:4", "--k": "4", "--keep": "0.2:0.8",
            "--out": str(tmp_path / "o.jsonl")}
    base.update(dict(zip(args[::2], args[1::2])))
    argv = ["filter"] + [x for kv in base.items() for x in kv] + TINY
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("thinkrl filter: error:") and msg in err and "\n" not in err


def test_real_engine_on_micro_checkpoint(tmp_path, capsys):
    from thinkrl.models.micro import build_micro_model, build_tokenizer

    tok = build_tokenizer()
    model = build_micro_model(tok, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32)
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "kept.jsonl"
    for spec in [str(tmp_path / "ckpt"), "micro"]:
        rc = cli_main(["filter", "--model", spec, "--task", "arithmetic", "--data", "generated:5", "--k", "3",
                       "--keep", "0:1", "--out", str(out), "-q", *TINY])
        assert rc == 0
        hist = json.loads(hist_path_for(out).read_text())
        assert sum(hist["counts"]) == 5 and len(hist["counts"]) == 4
        rows = [json.loads(x) for x in out.read_text().splitlines()]
        assert len(rows) == 5 == hist["n_kept"]  # keep 0:1 keeps everything
        assert all(r["pass_rate"] in (0.0, 1 / 3, 2 / 3, 1.0) for r in rows)
