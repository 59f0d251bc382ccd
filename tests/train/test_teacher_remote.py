"""A remote teacher (algo.distill_teacher=http://...): thinkrl servers on 127.0.0.1 score the student's tokens as the
local Teacher does, over both APIs; bad or unreachable URLs and another vocabulary stop at load with one line; a
short distillation run trains against it."""
from __future__ import annotations

import json
import socket

import pytest
import torch

from thinkrl.cli import main
from thinkrl.config import ConfigError, load_config
from thinkrl.models.loading import ModelLoadError, load_checkpoint
from thinkrl.models.micro import build_micro_model, build_tokenizer
from thinkrl.rollout.engine import EmbeddedEngine
from thinkrl.rollout.hf import HFEngine
from thinkrl.rollout.server import Server
from thinkrl.system.train import train_rl
from thinkrl.train.teacher import RemoteTeacher, Teacher
from thinkrl.types import Trajectory

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
        "model.intermediate_size=64", "data.num_train=64", "data.num_eval=8", "rollout.n=4",
        "rollout.batch_prompts=4", "rollout.max_new_tokens=8", "eval.k=0", "log.progress=false",
        "run.threads=1", "task.params.max_digits=2"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    tok = build_tokenizer()
    build_micro_model(tok, hidden_size=48, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=96,
                      seed=3).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def servers(teacher_dir):
    """Two thinkrl servers over the teacher checkpoint: the embedded engine and the HF engine."""
    out = []
    for kind in (EmbeddedEngine, HFEngine):
        model, tok = load_checkpoint(teacher_dir)
        engine = EmbeddedEngine(model.eval(), tokenizer=tok, max_seqs=8) if kind is EmbeddedEngine else \
            HFEngine(model.eval(), tok)
        srv = Server(engine, tok, model=model, port=0)
        out.append((srv, engine, f"http://127.0.0.1:{srv.start()}"))
    yield [u for _, _, u in out]
    for srv, engine, _ in out:
        srv.stop()
        engine.close()


def trajectories(tok, k=6):
    g = torch.Generator().manual_seed(0)
    trajs = []
    for i in range(k):  # groups of 3 sharing a prompt of 5 tokens
        n = 5 + 2 + i
        toks = torch.randint(8, len(tok), (n,), generator=g).tolist()
        if i % 3:
            toks[:5] = trajs[i - i % 3].tokens[:5]
        trajs.append(Trajectory(f"s{i}", f"g{i // 3}", toks, [False] * 5 + [True] * (n - 5), [0.0] * n,
                                [-1] * n, prompt_len=5))
    return trajs


@pytest.mark.parametrize("api", ["sglang", "openai"])
def test_remote_teacher_equals_the_local_teacher(teacher_dir, servers, api):
    tok = build_tokenizer()
    cfg = load_config(None, TINY)
    trajs = trajectories(tok)
    want = Teacher.load(teacher_dir, tok, cfg.train, "cpu").logprobs(trajs)
    for urls in (servers[0], ",".join(servers)):  # the embedded engine's server; both servers
        got = RemoteTeacher.connect(urls, tok, api).logprobs(trajs)
        assert len(got) == len(want)
        for a, b, t in zip(got, want, trajs):
            assert len(a) == len(t.tokens) and a[0] == 0.0 and a == pytest.approx(b, abs=1e-4)


def test_maybe_create_picks_the_remote_teacher(servers):
    cfg = load_config(None, [*TINY, f"algo.distill_teacher={servers[0]}", "algo.distill_teacher_api=openai",
                             "train.packing=false"])  # (packing is the local teacher's need only)
    teacher = Teacher.maybe_create(cfg, build_tokenizer(), "cpu")
    assert isinstance(teacher, RemoteTeacher) and teacher.engine.api == "openai"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_or_wrong_teacher_stops_at_load_with_one_line(servers):
    tok = build_tokenizer()
    url = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(ModelLoadError) as e:
        RemoteTeacher.connect(url, tok, max_retries=1)
    msg = str(e.value)
    assert f"algo.distill_teacher={url!r}" in msg and "no server reachable" in msg and "\n" not in msg
    with pytest.raises(ModelLoadError, match=f"teacher server {url} cannot score"):  # one bad server of two
        RemoteTeacher.connect(f"{servers[0]},{url}", tok, max_retries=1)
    bigger = build_tokenizer()
    bigger.add_tokens(["<|extra|>"])  # the policy has a token the teacher's vocabulary lacks
    with pytest.raises(ModelLoadError, match="cannot score the policy's token ids.*out of range"):
        RemoteTeacher.connect(servers[0], bigger)
    for bad in ("ftp://host:1", "http://", "http://a:1,file:///x"):
        with pytest.raises(ConfigError, match="algo.distill_teacher: a remote teacher is one or more"):
            load_config(None, [*TINY, f"algo.distill_teacher={bad}"])
    with pytest.raises(ConfigError, match="algo.distill_teacher_api"):
        load_config(None, [*TINY, "algo.distill_teacher_api=grpc"])


def test_cli_names_the_unreachable_teacher_in_one_line(tmp_path, capsys):
    url = f"http://127.0.0.1:{_closed_port()}"
    rc = main(["train", *TINY, f"run.output_dir={tmp_path / 'run'}", "train.steps=1", f"algo.distill_teacher={url}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "algo.distill_teacher=" in err[0] and url in err[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # stopped before any step


def test_short_distillation_run_against_a_remote_teacher(servers, tmp_path):
    steps = 2
    cfg = load_config(None, [*TINY, f"run.output_dir={tmp_path / 'run'}", f"train.steps={steps}",
                             f"algo.distill_teacher={servers[0]}", "algo.distill_verifier_coef=0"])
    train_rl(cfg)
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == steps
    for r in recs:
        assert r["distill/teacher_logp"] < 0 and r["distill/reverse_kl"] == r["distill/reverse_kl"]
