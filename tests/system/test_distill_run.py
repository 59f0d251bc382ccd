"""On-policy distillation end to end on a tiny model: the teacher (thinkrl.train.teacher) loads a checkpoint,
refuses another tokenizer with one line, scores tokens exactly as the trainer's packed forward does, and a short
pure-distillation run moves the student toward the teacher (the per-token reverse KL falls)."""
from __future__ import annotations

import json

import pytest
import torch

from thinkrl.cli import main
from thinkrl.config import load_config
from thinkrl.models.loading import ModelLoadError, load_checkpoint
from thinkrl.models.micro import build_tokenizer
from thinkrl.system.train import train_rl, train_sft
from thinkrl.train.engine import TrainEngine
from thinkrl.train.teacher import Teacher, same_tokenizer
from thinkrl.types import Trajectory

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
        "model.intermediate_size=64", "data.num_train=200", "data.num_eval=16", "rollout.n=4",
        "rollout.batch_prompts=8", "rollout.max_new_tokens=12", "eval.k=0", "log.progress=false",
        "run.threads=1", "task.params.max_digits=2"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny model SFT'd on the task's demonstrations: peaked where a fresh model is not."""
    out = tmp_path_factory.mktemp("teacher")
    cfg = load_config(None, [*TINY, f"run.output_dir={out}", "train.sft_steps=40", "train.sft_batch_size=32",
                             "train.sft_lr=0.01"])
    train_sft(cfg)
    return str(out / "checkpoints" / "step_000040")


def test_another_tokenizer_stops_at_load_with_one_line(teacher_dir, tmp_path):
    model, tok = load_checkpoint(teacher_dir)
    other = build_tokenizer()
    other.add_tokens(["<|extra|>"])
    model.save_pretrained(tmp_path / "t")
    other.save_pretrained(tmp_path / "t")
    assert same_tokenizer(tok, other) is not None and same_tokenizer(tok, build_tokenizer()) is None
    cfg = load_config(None, TINY)
    with pytest.raises(ModelLoadError) as e:
        Teacher.load(str(tmp_path / "t"), tok, cfg.train, "cpu")
    msg = str(e.value)
    assert "algo.distill_teacher=" in msg and "tokenizer is not the policy's" in msg and "\n" not in msg
    with pytest.raises(ModelLoadError, match="remote teacher"):
        Teacher.load("http://localhost:30000", tok, cfg.train, "cpu")
    with pytest.raises(ModelLoadError, match="not a directory"):
        Teacher.load(str(tmp_path / "absent"), tok, cfg.train, "cpu")


def test_cli_names_the_bad_teacher_in_one_line(tmp_path, capsys):
    rc = main(["train", *TINY, f"run.output_dir={tmp_path / 'run'}", "train.steps=1",
               f"algo.distill_teacher={tmp_path / 'nope'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "algo.distill_teacher=" in err[0]


def test_teacher_logprobs_are_the_trainers_packed_forward(teacher_dir):
    model, tok = load_checkpoint(teacher_dir)
    cfg = load_config(None, TINY)
    teacher = Teacher.load(teacher_dir, tok, cfg.train, "cpu")
    assert not any(p.requires_grad for p in teacher.model.parameters()) and not teacher.model.training
    g = torch.Generator().manual_seed(0)
    trajs = []
    for i in range(6):  # groups of 3 sharing a prompt of 5 tokens
        n = 5 + 2 + i
        toks = torch.randint(8, len(tok), (n,), generator=g).tolist()
        if i % 3:
            toks[:5] = trajs[i - i % 3].tokens[:5]
        trajs.append(Trajectory(f"s{i}", f"g{i // 3}", toks, [False] * 5 + [True] * (n - 5), [0.0] * n,
                                [-1] * n, prompt_len=5))
    want = TrainEngine(model, cfg.train, cfg.algo).logprobs(trajs)
    got = teacher.logprobs(trajs)
    for a, b in zip(got, want):
        assert a == pytest.approx(b, abs=1e-5)


def test_pure_distillation_moves_the_student_toward_the_teacher(teacher_dir, tmp_path):
    steps = 12
    cfg = load_config(None, [*TINY, f"run.output_dir={tmp_path / 'run'}", f"train.steps={steps}", "algo.lr=0.01",
                             f"algo.distill_teacher={teacher_dir}", "algo.distill_verifier_coef=0"])
    train_rl(cfg)
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kl = [r["distill/reverse_kl"] for r in recs]
    tl = [r["distill/teacher_logp"] for r in recs]
    assert len(kl) == steps and all(k == k for k in kl)
    first, last = sum(kl[:3]) / 3, sum(kl[-3:]) / 3
    assert last < 0.6 * first, kl  # the student's samples became far likelier under the teacher
    assert sum(tl[-3:]) / 3 > sum(tl[:3]) / 3, tl
