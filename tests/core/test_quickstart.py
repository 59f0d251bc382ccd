"""The quickstart: a short version always (the mechanics); the full run is marked slow."""
import json

import pytest

from thinkrl.cli import main
from thinkrl.tools.report import normalise_eval

SHORT = ["train.sft_steps=4", "train.steps=2", "data.num_train=300", "data.num_eval=20", "eval.k=0",
         "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
         "model.intermediate_size=64", "rollout.batch_prompts=4", "rollout.n=4", "log.progress=false", "run.threads=1"]


def test_quickstart_short_writes_summary(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--output", str(out), "--control", *SHORT]) == 0
    s = json.loads((out / "summary.json").read_text())
    for key in ["teacher_accuracy", "sft_accuracy", "rl_accuracy", "sft_more_accuracy"]:
        assert 0.0 <= s[key] <= 1.0, key
    assert s["steps"] == 2 and s["eval_problems"] == 20 and s["wall_seconds"] > 0
    assert 0.5 <= s["teacher_accuracy"] <= 0.8
    printed = capsys.readouterr().out
    assert "SFT -> RL (GRPO)" in printed and "SFT, more (control)" in printed
    assert (out / "rl" / "metrics.jsonl").exists() and (out / "rl" / "config.yaml").exists()
    for phase in ("sft", "sft_more"):  # each phase's evaluation beside its metrics, for the report
        assert normalise_eval(json.loads((out / phase / "eval.json").read_text()))["pass@1"] == s[f"{phase}_accuracy"]
    page = (out / "report.html").read_text()
    assert "<title>thinkrl report: sft, rl, sft_more</title>" in page and "Plotly.newPlot(" in page


@pytest.mark.slow
def test_quickstart_full_rl_beats_sft_and_control(tmp_path):
    """The claim of the README, on the packaged config (minutes on 2 CPU cores)."""
    out = tmp_path / "qs"
    assert main(["quickstart", "--output", str(out), "--control", "log.progress=false"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["eval_problems"] >= 500
    assert s["rl_accuracy"] >= max(s["sft_accuracy"], s["sft_more_accuracy"]) + 0.15
