"""Remote-server failover with a ledger of sample ids: one of two servers killed mid-rollout, the rollout completes
with every sample answered exactly once and correctly; the server restarted on its port rejoins (gets requests
again, first brought up to the current weight version); every server down is a RemoteError after the bounded
retries, never a hang. Fast: servers in threads, stopped abruptly (connections aborted). Slow: `thinkrl serve`
processes, SIGKILLed."""
from __future__ import annotations

import asyncio
import collections
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import torch

from thinkrl.models.micro import build_micro_model, build_tokenizer
from thinkrl.rollout.engine import EmbeddedEngine
from thinkrl.rollout.remote import RemoteEngine, RemoteError
from thinkrl.rollout.server import Server
from thinkrl.types import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")
TOK = build_tokenizer()
PROMPTS = {f"s{i}": TOK.encode(f"{i}+{i}=") for i in range(12)}  # sample id -> prompt
GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0, stop_token_ids=[TOK.eos_token_id])


def micro(seed=0):
    return build_micro_model(TOK, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
                             max_position=64, seed=seed).eval()


@torch.no_grad()
def greedy_reference(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(nxt)
        if nxt == TOK.eos_token_id:
            break
    return ids[len(prompt):]


def serve(port=0, seed=0):
    model = micro(seed)
    srv = Server(EmbeddedEngine(model, tokenizer=TOK, max_seqs=8), TOK, model=model, port=port)
    srv.start()
    return srv


def kill(srv):
    srv.stop()
    srv.engine.close()


def post(port, path, body=None):
    return httpx.post(f"http://127.0.0.1:{port}{path}", json=body or {}, timeout=30, trust_env=False).status_code


async def rollout(remote, ledger, ids, params=GREEDY):
    async def one(sid):
        gens = await remote.generate(PROMPTS[sid], params, n=2)
        ledger[sid] += 1
        return sid, gens
    return dict(await asyncio.gather(*[one(s) for s in ids]))


def wait_for(cond, timeout=30.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.01)


def test_failover_rejoin_and_all_down(tmp_path):
    servers = [serve(), serve()]
    ports = [s.port for s in servers]
    remote = RemoteEngine([f"http://127.0.0.1:{p}" for p in ports], max_concurrency=4, retry_backoff=0.01,
                          dead_cooldown=0.5, max_retries=3)
    ref_model = micro(0)
    try:
        # 1. both servers hold their requests (paused in place); kill one with requests in flight
        for p in ports:
            assert post(p, "/pause_generation", {"mode": "in_place"}) == 200
        ledger = collections.Counter()

        async def phase1():
            task = asyncio.create_task(rollout(remote, ledger, sorted(PROMPTS)))
            await asyncio.to_thread(wait_for, lambda: all(s.queued for s in servers))
            kill(servers[0])  # mid-rollout: its in-flight requests get no answer
            await asyncio.to_thread(post, ports[1], "/continue_generation")
            return await asyncio.wait_for(task, 120)

        out = asyncio.run(phase1())
        assert ledger == {sid: 1 for sid in PROMPTS}  # nothing lost, nothing twice
        for sid, gens in out.items():
            assert len(gens) == 2
            assert all(g.tokens == greedy_reference(ref_model, PROMPTS[sid], 8) for g in gens), sid
        st = remote.stats()
        assert st["failovers"] >= 1 and st["servers"][0]["failures"] >= 1

        # 2. new weights while server 0 is down: only server 1 takes them
        new = micro(seed=1)
        new.save_pretrained(tmp_path / "v1")
        remote.load_weights(str(tmp_path / "v1"), version=1)
        assert servers[1].engine.version == 1

        # 3. server 0 restarted on its port (version 0 weights): it rejoins, first brought up to version 1
        servers[0] = serve(port=ports[0])
        time.sleep(0.6)  # the dead cooldown
        ledger = collections.Counter()
        out = asyncio.run(rollout(remote, ledger, sorted(PROMPTS)))
        assert ledger == {sid: 1 for sid in PROMPTS}
        assert servers[0].counters["requests"] > 0 and servers[0].engine.version == 1
        for sid, gens in out.items():
            assert all(g.versions == [1] * len(g.tokens) for g in gens)
            assert all(g.tokens == greedy_reference(new, PROMPTS[sid], 8) for g in gens), sid

        # 4. every server down: a clear RemoteError after the bounded retries, no hang
        for s in servers:
            kill(s)
        t0 = time.monotonic()
        with pytest.raises(RemoteError, match="no server reachable"):
            asyncio.run(asyncio.wait_for(remote.generate(PROMPTS["s0"], GREEDY), 60))
        assert time.monotonic() - t0 < 60
    finally:
        for s in servers:
            kill(s)


# ---------------------------------------------------------------------------------------------- slow: processes
def spawn(model_dir, port):
    code = ("import sys; from thinkrl.rollout.server import main; "
            f"sys.exit(main(['--model', {str(model_dir)!r}, '--port', '{port}', '--engine', 'embedded']))")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)

    def up():
        assert proc.poll() is None, "thinkrl serve exited"
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2, trust_env=False).status_code == 200
        except httpx.TransportError:
            return False
    wait_for(up, timeout=120)
    return proc


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_failover_sigkilled_server_processes(tmp_path):
    model = micro(0)
    model.save_pretrained(tmp_path / "m")
    TOK.save_pretrained(tmp_path / "m")
    ports = [free_port(), free_port()]
    procs = [spawn(tmp_path / "m", p) for p in ports]
    remote = RemoteEngine([f"http://127.0.0.1:{p}" for p in ports], max_concurrency=4, retry_backoff=0.05,
                          dead_cooldown=0.5, max_retries=3)
    try:
        for p in ports:
            assert post(p, "/pause_generation", {"mode": "in_place"}) == 200
        ledger = collections.Counter()

        async def go():
            task = asyncio.create_task(rollout(remote, ledger, sorted(PROMPTS)))
            await asyncio.to_thread(wait_for, lambda: all(s.load for s in remote.servers))
            await asyncio.sleep(0.3)  # the requests reach the servers
            procs[0].send_signal(signal.SIGKILL)
            await asyncio.to_thread(post, ports[1], "/continue_generation")
            return await asyncio.wait_for(task, 300)

        out = asyncio.run(go())
        assert ledger == {sid: 1 for sid in PROMPTS}
        assert all(g.tokens == greedy_reference(model, PROMPTS[sid], 8) for sid, gs in out.items() for g in gs)
        assert remote.stats()["failovers"] >= 1
        procs[0].wait(10)
        procs[0] = spawn(tmp_path / "m", ports[0])  # restarted: it rejoins
        time.sleep(0.6)
        before = httpx.get(f"http://127.0.0.1:{ports[0]}/get_server_info", trust_env=False).json()["requests"]
        ledger = collections.Counter()
        asyncio.run(rollout(remote, ledger, sorted(PROMPTS)))
        assert ledger == {sid: 1 for sid in PROMPTS}
        after = httpx.get(f"http://127.0.0.1:{ports[0]}/get_server_info", trust_env=False).json()["requests"]
        assert after > before
        for p in procs:
            p.send_signal(signal.SIGKILL)
        with pytest.raises(RemoteError, match="no server reachable"):
            asyncio.run(asyncio.wait_for(remote.generate(PROMPTS["s0"], GREEDY), 60))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)


def test_training_run_stops_with_one_line_when_every_server_is_down(tmp_path):
    """`thinkrl train` with rollout.engine=remote: the only server dies after step 2; the run stops with one line
    (exit 2, RemoteError is a RunFault) after the bounded retries, and the checkpoints written before stay."""
    model = micro(0)
    model.save_pretrained(tmp_path / "m")
    TOK.save_pretrained(tmp_path / "m")
    srv = serve()
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "thinkrl.cli", "train", "--config", "thinkrl/configs/quickstart.yaml",
           f"model.path={tmp_path / 'm'}", "rollout.engine=remote", f"rollout.servers=[http://127.0.0.1:{srv.port}]",
           "train.steps=8", "train.save_every=1", "rollout.batch_prompts=4", "rollout.n=2", "rollout.max_new_tokens=8",
           f"run.output_dir={run}", "rollout.max_retries=1", "rollout.request_timeout=30", "log.progress=false"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        metrics = run / "metrics.jsonl"
        wait_for(lambda: proc.poll() is None and metrics.exists() and len(metrics.read_text().splitlines()) >= 2,
                 timeout=240)
        kill(srv)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        kill(srv)
    assert proc.returncode == 2, out[-3000:]
    last = [line for line in out.splitlines() if line.strip()][-1]
    assert last.startswith("thinkrl train: error:") and "no server reachable" in last, out[-3000:]
    assert "Traceback" not in out
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts[:2] == ["step_000001", "step_000002"] and not any(p.endswith(".tmp") for p in ckpts)
