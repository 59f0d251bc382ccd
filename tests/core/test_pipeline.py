"""`thinkrl quickstart --pipeline sft,dpo,rl`: the delta pairs, the stage list, and a short run's summary."""
import json

import pytest

from thinkrl.cli import main
from thinkrl.pipeline import delta_pairs, parse_stages
from thinkrl.tasks.arithmetic import Arithmetic, has_carry

SHORT = ["train.sft_steps=4", "train.steps=2", "dpo.steps=2", "dpo.batch_size=8", "data.num_train=300",
         "data.num_eval=20", "eval.k=0", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
         "model.num_kv_heads=1", "model.intermediate_size=64", "rollout.batch_prompts=4", "rollout.n=4",
         "log.progress=false", "run.threads=1"]


def test_delta_pairs_are_the_carry_problems_the_teacher_works():
    task = Arithmetic(drop_rate=0.6)
    samples = task.generate(400, seed=0)
    pairs = delta_pairs(task, samples)
    by_id = {s.id: s for s in samples}
    want = [s.id for s in samples if has_carry(s.meta["a"], s.meta["b"]) and not task.teacher_drops(s.meta["a"], s.meta["b"])]
    assert [p.id for p in pairs] == want and 0 < len(pairs) < len(samples)
    for p in pairs:
        s = by_id[p.id]
        assert task.reward(p.chosen[0]["content"], s) == 1.0 and task.reward(p.rejected[0]["content"], s) == 0.0
        assert p.prompt == task.build_prompt(s) and p.meta["rejected_model"] == "teacher-drops-carries"
    a, b = 58, 67  # the weaker teacher drops every carry: 8+7=15 5+6=11 -> 15
    s = type(samples[0])(id="x", prompt="58+67", answer=125, meta={"a": a, "b": b})
    assert task.weak_demonstration(s) == "8+7=15 5+6=11 \\boxed{15}"


@pytest.mark.parametrize("text, msg", [("sft,ppo", "unknown stage 'ppo'"), ("dpo,rl", "start with sft"),
                                       ("sft,rl,dpo", "order"), ("sft,sft", "each once")])
def test_bad_stage_lists(text, msg):
    with pytest.raises(ValueError, match=msg):
        parse_stages(text)
    assert parse_stages("sft, dpo ,rl") == ["sft", "dpo", "rl"]


def test_cli_bad_pipeline_is_one_line(tmp_path, capsys):
    assert main(["quickstart", "--pipeline", "sft,ppo", "--output", str(tmp_path / "q"), *SHORT]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "thinkrl quickstart: error: --pipeline: unknown stage 'ppo'; valid: sft, dpo, rl"]
    assert not (tmp_path / "q").exists()


def test_short_pipeline_writes_every_stage_and_reuses_a_finished_sft(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--pipeline", "sft,dpo,rl", "--control", "--output", str(out), *SHORT]) == 0
    s = json.loads((out / "summary.json").read_text())
    for key in ("teacher_accuracy", "sft_accuracy", "dpo_accuracy", "rl_accuracy", "sft_more_accuracy"):
        assert 0.0 <= s[key] <= 1.0, key
    assert s["pipeline"] == "sft,dpo,rl" and s["dpo_steps"] == 2 and s["dpo_pairs"] > 0 and not s["sft_reused"]
    assert s["sft_more_steps"] >= 1
    printed = capsys.readouterr().out
    assert "SFT -> DPO (delta pairs)" in printed and "SFT, more (control)" in printed
    for phase in ("sft", "dpo", "rl", "sft_more"):
        assert json.loads((out / phase / "eval.json").read_text())["pass@1"] == s[f"{phase}_accuracy"]
    dpo = [json.loads(x) for x in (out / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in dpo] == [1, 2] and {"dpo/loss", "dpo/reward_acc", "dpo/reward_margin"} <= set(dpo[0])
    assert "dpo" in (out / "report.html").read_text()
    # a rerun into the same directory, other DPO settings, reuses the finished SFT stage: the same SFT model, no
    # SFT step
    n_sft = len((out / "sft" / "metrics.jsonl").read_text().splitlines())
    assert main(["quickstart", "--pipeline", "sft,dpo", "--output", str(out), *SHORT, "dpo.steps=1", "dpo.beta=0.3"]) == 0
    s2 = json.loads((out / "summary.json").read_text())
    assert s2["sft_reused"] and s2["sft_accuracy"] == s["sft_accuracy"] and "rl_accuracy" not in s2
    assert s2["dpo_steps"] == 1
    assert len((out / "sft" / "metrics.jsonl").read_text().splitlines()) == n_sft
