"""The engine process (rollout.placement=process) killed with SIGKILL: every wait on it ends with one clear error
naming the process and its exit code, never a hang; a run stops with that line (exit 2), its metrics kept."""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from thinkrl.models.micro import build_micro_model
from thinkrl.rollout.process import EngineProcessError, ProcessEngine
from thinkrl.types import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")

HANG_GUARD_S = 120  # a test that waits this long has hung: the point of these tests is that nothing does


@pytest.fixture(scope="module")
def engine(tok):
    model = build_micro_model(tok, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
                              max_position=256, seed=0)
    eng = ProcessEngine(model, tok, threads=1)
    yield eng, model
    eng.close()


def test_a_killed_engine_process_fails_every_wait_with_its_exit_code(engine):
    eng, model = engine
    params = SamplingParams(max_new_tokens=200, temperature=1.0, seed=1)  # long: still running when killed

    async def gen_then_kill():
        task = asyncio.ensure_future(eng.generate([1, 5, 6], params, 4))
        while eng.call("progress", timeout=HANG_GUARD_S) < 2:  # it is generating
            await asyncio.sleep(0.01)
        os.kill(eng._proc.pid, signal.SIGKILL)
        return await asyncio.wait_for(task, HANG_GUARD_S)

    with pytest.raises(EngineProcessError) as err:
        asyncio.run(gen_then_kill())
    msg = str(err.value)
    assert f"pid {eng._proc.pid}" in msg and "SIGKILL (exit code -9)" in msg and "\n" not in msg
    # every later call fails at once with the same line, whatever it waits on
    for call in (lambda: asyncio.run(asyncio.wait_for(eng.generate([1, 5], params, 1), HANG_GUARD_S)),
                 lambda: eng.load_weights(model.state_dict(), 1),
                 lambda: eng.stats(),
                 lambda: eng.call("progress", timeout=HANG_GUARD_S)):
        with pytest.raises(EngineProcessError, match="SIGKILL"):
            call()
    assert torch.get_num_threads() == 1


def test_calls_racing_the_death_cannot_wait_forever(tok):
    # calls made while the reader is failing the pending ones must fail too, not sit in the pending table
    model = build_micro_model(tok, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
                              max_position=64, seed=0)
    eng = ProcessEngine(model, tok, threads=1)
    errors: list[str] = []

    def hammer():
        while True:
            try:
                eng.call("progress", timeout=HANG_GUARD_S)
            except EngineProcessError as e:
                errors.append(str(e))
                return
            except concurrent.futures.TimeoutError:  # a wait that outlived the process
                errors.append("hung")
                return

    threads = [threading.Thread(target=hammer, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    os.kill(eng._proc.pid, signal.SIGKILL)
    for t in threads:
        t.join(timeout=HANG_GUARD_S + 10)
    eng.close()
    assert len(errors) == 4 and all("exit code -9" in e for e in errors), errors


DRIVER = textwrap.dedent("""
    import os, signal, sys
    from thinkrl.cli import main
    from thinkrl.rollout.process import ProcessEngine
    from thinkrl.system.rundir import RunDir

    started = []
    init = ProcessEngine.__init__

    def remember(self, *a, **k):
        init(self, *a, **k)
        started.append(self)

    log = RunDir.log

    def log_then_kill(self, record):  # the engine process dies right after the first step is written
        log(self, record)
        if record.get("step") == 1:
            os.kill(started[0]._proc.pid, signal.SIGKILL)

    if __name__ == "__main__":
        ProcessEngine.__init__ = remember
        RunDir.log = log_then_kill
        sys.exit(main(sys.argv[1:]))
""")


def test_a_run_whose_engine_process_is_killed_stops_with_one_line(tmp_path):
    script = tmp_path / "drive.py"
    script.write_text(DRIVER)
    out = tmp_path / "run"
    over = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
            "model.intermediate_size=64", "data.num_train=200", "data.num_eval=4", "rollout.n=4",
            "rollout.batch_prompts=4", "rollout.max_new_tokens=8", "eval.k=0", "log.progress=false",
            "run.threads=1", "train.steps=50", "rollout.max_staleness=1", "rollout.placement=process",
            "algo.loss=decoupled_ppo", f"run.output_dir={out}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, str(script), "train", *over], capture_output=True, text=True,
                       timeout=HANG_GUARD_S * 3, env=env, cwd=tmp_path)
    lines = [x for x in p.stderr.splitlines() if "error" in x.lower() or "Traceback" in x]
    assert p.returncode == 2 and len(lines) == 1, p.stderr[-3000:]
    assert lines[0].startswith("thinkrl train: error: the engine process (rollout.placement=process, pid ")
    assert "SIGKILL (exit code -9)" in lines[0]
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[0] == 1 and len(steps) < 50  # what was written stays; the run did not go on without its engine
    # train.save_every=0 (a checkpoint at the end only): what was trained before the fault is kept in one
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step_{steps[-1]:06d}"]
