"""The RL loop end to end on a tiny model: run dir, metrics, checkpoints, exact resume, CLI errors."""
import json

import pytest
import torch
from safetensors.torch import load_file

from thinkrl.cli import main
from thinkrl.config import load_config
from thinkrl.system.train import train_rl

TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
        "model.intermediate_size=64", "data.num_train=200", "data.num_eval=16", "rollout.n=4",
        "rollout.batch_prompts=4", "rollout.max_new_tokens=12", "eval.k=2", "log.progress=false",
        "algo.lr=0.01", "run.threads=1"]


def _cfg(out, *extra):
    return load_config(None, TINY + [f"run.output_dir={out}", *extra])


def _weights(ckpt_dir):
    return load_file(str(ckpt_dir / "model.safetensors"))


def test_train_writes_run_dir(tmp_path):
    res = train_rl(_cfg(tmp_path / "r", "train.steps=2"))
    assert res["steps"] == 2 and 0.0 <= res["pass@1"] <= 1.0 and "avg@2" in res
    recs = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]
    for key in ["reward/mean", "acc/mean", "group/all_correct_frac", "group/all_wrong_frac", "len/response_mean",
                "loss/policy", "clip/frac", "grad/norm", "perf/tokens_per_s", "perf/step_seconds"]:
        assert key in recs[0], key
    assert (tmp_path / "r" / "config.yaml").exists()
    from transformers import AutoModelForCausalLM

    ckpt = tmp_path / "r" / "checkpoints" / "step_000002"
    AutoModelForCausalLM.from_pretrained(ckpt)  # plain transformers loads the checkpoint


@pytest.mark.parametrize("engine", ["embedded", "hf"])
def test_resume_continues_exactly(tmp_path, engine):
    straight = tmp_path / "a"
    train_rl(_cfg(straight, "train.steps=3", f"rollout.engine={engine}"))
    interrupted = tmp_path / "b"
    train_rl(_cfg(interrupted, "train.steps=1", "train.save_every=1", f"rollout.engine={engine}"))
    train_rl(_cfg(interrupted, "train.steps=3", f"rollout.engine={engine}"), resume=True)
    recs = [json.loads(x) for x in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]
    wa, wb = _weights(straight / "checkpoints" / "step_000003"), _weights(interrupted / "checkpoints" / "step_000003")
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k


def test_resume_without_checkpoint_is_an_error(tmp_path, capsys):
    rc = main(["train", f"run.output_dir={tmp_path}", "--resume", *TINY])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("thinkrl train: error: --resume: no checkpoint") and "\n" not in err


@pytest.mark.parametrize("argv, needle", [
    (["train", "--config", "/nonexistent.yaml"], "config file not found: /nonexistent.yaml"),
    (["train", "algo.lrr=1"], "did you mean 'algo.lr'"),
    (["train", "data.train_path=/nonexistent.jsonl"], "/nonexistent.jsonl"),
    (["eval", "--model", "/nonexistent_dir"], "/nonexistent_dir"),
    (["bench", "nope"], "unknown benchmark 'nope'"),
])
def test_cli_bad_input_is_one_clear_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "Traceback" not in err and len(err.splitlines()) == 1
