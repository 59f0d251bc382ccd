"""kill -9 is a non-event: `thinkrl train` runs (real processes, the engine process too) are SIGKILLed before the
first checkpoint, mid-step and during a checkpoint write, then continued with --resume.
- run.deterministic=true: the per-step metrics equal the uninterrupted run's (sync and η = 2).
- free-running async: every step appears once, no prompt group is trained twice, none is lost (each started
  group is trained or still in the last checkpoint's rollouts), and staleness stays <= η.
The fast versions kill three times; the slow ones at random moments, more often."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
        "model.intermediate_size=64", "data.num_train=200", "data.num_eval=8", "rollout.n=4",
        "rollout.batch_prompts=4", "rollout.max_new_tokens=12", "eval.k=0", "log.progress=false",
        "algo.lr=0.01", "run.threads=1", "algo.loss=decoupled_ppo", "rollout.engine_threads=1"]


def _metrics(out: Path) -> list[dict]:
    p = out / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []


def _start(out: Path, over: list[str], env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "thinkrl.cli", "train", *TINY, f"run.output_dir={out}", *over]
    if (out / "config.yaml").exists():  # a run was started here: continue it, whatever state it is in
        cmd.append("--resume")
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _kill(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)  # the run and its engine process
    except ProcessLookupError:
        pass
    p.wait()


def _wait_lines(p: subprocess.Popen, out: Path, n: int, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while len(_metrics(out)) < n and p.poll() is None:
        assert time.monotonic() - t0 < timeout, "the run made no progress"
        time.sleep(0.02)


def _last_checkpoint_step(out: Path) -> int:
    root = out / "checkpoints"
    done = [int(p.name.split("_")[1]) for p in root.iterdir() if not p.name.endswith(".tmp")] if root.exists() else []
    return max(done, default=0)


def run_with_kills(out: Path, over: list[str], kills: list[tuple]) -> None:
    """kills: ("at", seconds after start) | ("after_step", n, extra seconds) | ("in_save", step or None: the
    first checkpoint this segment writes)."""
    value = lambda key: int(next(o for o in over if o.startswith(key)).split("=")[1])  # noqa: E731
    save_every, steps = value("train.save_every="), value("train.steps=")
    for kind, *arg in kills:
        if kind == "in_save" and arg[0] is None:
            arg = [_last_checkpoint_step(out) + save_every]
            if arg[0] > steps:  # the run has already finished its last checkpoint
                continue
        env = {"THINKRL_FAULT": f"kill_in_save:{arg[0]}"} if kind == "in_save" else None
        p = _start(out, over, env)
        if kind == "at":
            time.sleep(arg[0])
        elif kind == "after_step":
            _wait_lines(p, out, arg[0])
            time.sleep(arg[1])
        else:  # the run kills itself while writing that checkpoint
            p.wait(timeout=300)
            assert p.returncode == -signal.SIGKILL, p.stderr.read().decode()[-2000:]
        _kill(p)
    p = _start(out, over)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err.decode()[-3000:]


def _comparable(recs):
    return [{k: v for k, v in r.items() if not k.startswith(("perf/", "buffer/")) and k != "time"} for r in recs]


def _assert_same(a: list[dict], b: list[dict]) -> bool:
    """Equal within 1e-6; returns whether they are bit-identical."""
    assert [r["step"] for r in a] == [r["step"] for r in b]
    identical = True
    for ra, rb in zip(_comparable(a), _comparable(b)):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], abs=1e-6), (ra["step"], k)
            identical &= ra[k] == rb[k]
    return identical


STEPS = 6
DETERMINISTIC = {
    "sync": ["rollout.max_staleness=0"],
    "eta2": ["rollout.max_staleness=2"],
}


@pytest.mark.parametrize("mode", list(DETERMINISTIC))
def test_deterministic_run_killed_three_times_equals_the_uninterrupted_run(tmp_path, mode):
    over = DETERMINISTIC[mode] + [f"train.steps={STEPS}", "train.save_every=2", "run.deterministic=true"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_with_kills(straight, over, [])
    run_with_kills(killed, over, [("at", 1.0), ("in_save", 4), ("after_step", 5, 0.05)])
    assert _assert_same(_metrics(straight), _metrics(killed))  # bit-identical, not merely within 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(DETERMINISTIC))
@pytest.mark.parametrize("seed", [0, 1])
def test_deterministic_run_killed_at_random_moments(tmp_path, mode, seed):
    rnd = random.Random(seed)
    over = DETERMINISTIC[mode] + ["train.steps=10", "train.save_every=1", "run.deterministic=true"]
    kills = [("at", rnd.uniform(0.2, 3.0))] + [("after_step", rnd.randint(1, 9), rnd.uniform(0, 0.3))
                                              for _ in range(4)] + [("in_save", None)]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_with_kills(straight, over, [])
    run_with_kills(killed, over, kills)
    _assert_same(_metrics(straight), _metrics(killed))


def _check_free_running(out: Path, steps: int, eta: int, B: int) -> None:
    recs = _metrics(out)
    assert [r["step"] for r in recs] == list(range(1, steps + 1))  # every step once
    trained = [j for r in recs for j in r["groups"]]
    assert len(trained) == len(set(trained)) == steps * B  # no group twice
    assert max(r["staleness/max"] for r in recs) <= eta
    last = sorted((out / "checkpoints").iterdir())[-1]
    st = torch.load(last / "trainer_state.pt", weights_only=False)["rollouts"]
    kept = [i for i, _, _ in st["finished"]] + st["in_flight"]
    assert sorted(trained + kept) == list(range(st["next_index"]))  # none lost


def test_free_running_async_killed_trains_every_group_once(tmp_path):
    over = ["rollout.max_staleness=2", "train.steps=30", "train.save_every=1"]
    run_with_kills(tmp_path, over, [("after_step", 2, 0.0), ("in_save", None), ("after_step", 15, 0.0)])
    _check_free_running(tmp_path, 30, 2, 4)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_free_running_async_killed_at_random_moments(tmp_path, seed):
    rnd = random.Random(seed)
    over = ["rollout.max_staleness=2", "train.steps=12", "train.save_every=1"]
    kills = [("after_step", rnd.randint(1, 11), rnd.uniform(0, 0.3)) for _ in range(5)]
    run_with_kills(tmp_path, over, sorted(kills, key=lambda k: k[1]))
    _check_free_running(tmp_path, 12, 2, 4)
