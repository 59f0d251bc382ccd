"""`thinkrl eval` on the micro model: eval.json's pass@k is the unbiased estimator of its own per_problem.jsonl,
maj@k the vote over its answers; a run's checkpoints/ gives one eval.json per checkpoint with its step."""
from __future__ import annotations

import json
import sys
import types

import pytest

from thinkrl.cli import main
from thinkrl.config import load_config
from thinkrl.eval.metrics import majority_vote, pass_at_k
from thinkrl.models.loading import load_policy
from thinkrl.system.checkpoint import write_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

K = 4


def coin(response: str, sample) -> float:
    """A reward the random micro model earns some of the time: the response's characters have an even sum."""
    return float(sum(map(ord, response)) % 2 == 0)


@pytest.fixture
def coin_task(monkeypatch):
    mod = types.ModuleType("thinkrl_test_coin_task")
    mod.coin = coin
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    return f"{mod.__name__}:coin"


@pytest.fixture
def problems(tmp_path):
    p = tmp_path / "problems.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"{i}+{i}", "answer": str(2 * i)}) + "\n" for i in range(6)))
    return p


def args(task, problems, k=K, tokens=6):
    # six problems from a file (data.eval_path alone), graded by `coin`; few tokens
    return [f"task.name={task}", f"data.eval_path={problems}", f"eval.k={k}", f"rollout.max_new_tokens={tokens}",
            "eval.temperature=1.0", "log.progress=false", "eval.price_per_mtok=2.0", "task.reward_isolation=inline"]


def read(d):
    return json.loads((d / "eval.json").read_text()), [json.loads(x) for x in (d / "per_problem.jsonl").read_text().splitlines()]


def test_eval_json_is_the_estimator_of_its_own_per_problem_rows(tmp_path, coin_task, problems, capsys):
    assert main(["eval", "--model", "micro", "--output", str(tmp_path / "out"), *args(coin_task, problems)]) == 0
    assert "pass@4" in capsys.readouterr().out  # the table
    figures, rows = read(tmp_path / "out")
    assert figures["num_problems"] == len(rows) == 6 and figures["k"] == K
    counts = [r["num_correct"] for r in rows]
    assert all(r["num_samples"] == K and r["num_correct"] == sum(r["correct"]) for r in rows)
    assert 0 < sum(counts) < K * len(rows), "the coin task should be neither always right nor always wrong"
    assert len(set(counts)) > 1  # problems differ, so pass@j really depends on j
    for j in range(2, K + 1):
        assert figures[f"pass@{j}"] == pytest.approx(sum(pass_at_k(K, c, j) for c in counts) / len(rows))
    assert figures["pass@1/sampled"] == pytest.approx(sum(counts) / (K * len(rows))) == figures[f"avg@{K}"]
    assert figures[f"maj@{K}"] == pytest.approx(sum(majority_vote(r["answers"], r["correct"]) for r in rows) / len(rows))
    assert figures["pass@1"] == sum(r["greedy_correct"] for r in rows) / len(rows)
    tokens = sum(sum(r["lengths"]) for r in rows)
    assert all(len(r["lengths"]) == K + 1 for r in rows) and figures["tokens_per_problem"] == tokens / len(rows)
    assert figures["cost_usd"] == pytest.approx(tokens * 2.0 / 1e6) and figures["len/max"] <= 6
    assert figures["truncated_frac"] == sum(sum(r["truncated"]) for r in rows) / (len(rows) * (K + 1))
    # the task has no answer extractor: maj@k votes over the whitespace-normalised response text
    assert all(a is not None and a == " ".join(a.split()) for r in rows for a in r["answers"])


def test_every_checkpoint_of_a_run_in_step_order(tmp_path, coin_task, problems, capsys):
    cfg = load_config(None, [])
    root = tmp_path / "run" / "checkpoints"
    for step, seed in [(10, 1), (20, 2)]:
        model, tok = load_policy(cfg.model, seed=seed)
        write_checkpoint(root, step, model, tok, {}, keep=3)
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(root), "--output", str(out), *args(coin_task, problems, 2, 4), "data.num_eval=3"]) == 0
    table = capsys.readouterr().out
    assert table.index("step_000010") < table.index("step_000020")
    for name, step in [("step_000010", 10), ("step_000020", 20)]:
        figures, rows = read(out / name)
        assert figures["step"] == step and figures["checkpoint"] == str(root / name) and len(rows) == 3
    # the run directory names the same checkpoints
    assert main(["eval", "--model", str(tmp_path / "run"), "--json", *args(coin_task, problems, 0, 4), "data.num_eval=2"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [r["step"] for r in lines] == [10, 20] and all("pass@2" not in r for r in lines)


def test_a_missing_model_is_one_line(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"thinkrl eval: error: --model {tmp_path / 'nope'}: no such model directory or checkpoint"
