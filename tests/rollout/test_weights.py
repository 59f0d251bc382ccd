"""thinkrl.rollout.weights and the engine process: every transport loads exactly the pushed weights."""
from __future__ import annotations

import asyncio
import time

import pytest
import torch

from thinkrl.models.micro import build_micro_model
from thinkrl.rollout import weights as W
from thinkrl.rollout.engine import EmbeddedEngine
from thinkrl.rollout.process import EngineProcessError, ProcessEngine
from thinkrl.types import SamplingParams


@pytest.fixture(scope="module")
def models(tok):
    return [build_micro_model(tok, seed=s).eval() for s in (0, 1)]


@pytest.fixture(scope="module")
def proc(models, tok):
    eng = ProcessEngine(models[0], tok, threads=1, stop_at_eos=False)
    yield eng
    eng.close()


@torch.no_grad()
def hf_logprobs(model, prompt, tokens):
    logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0].float()
    lp = torch.log_softmax(logits[len(prompt) - 1: -1], -1)
    return lp.gather(1, torch.tensor(tokens)[:, None])[:, 0]


def check_serves(engine, model, tok, version):
    """The engine's samples carry `version` and its log-probs are `model`'s (teacher-forced HF forward)."""
    p = tok.encode("What is 12+7?")
    g = engine.generate_batch([p], SamplingParams(max_new_tokens=12, seed=1))[0][0]
    assert g.versions == [version] * 12
    assert (hf_logprobs(model, p, g.tokens) - torch.tensor(g.logprobs)).abs().max() < 1e-4


def test_unique_tensors_and_safetensors_round_trip(models, tmp_path):
    sd = models[0].state_dict()
    uniq = W.unique_tensors(sd)
    assert models[0].config.tie_word_embeddings and "lm_head.weight" in sd and "lm_head.weight" not in uniq
    assert len(uniq) == len(sd) - 1
    path = W.save_safetensors(sd, tmp_path / "m" / "model.safetensors")
    back = W.load_safetensors(path.parent)
    assert set(back) == set(uniq) and all(torch.equal(back[k], uniq[k]) for k in uniq)
    with pytest.raises(ValueError, match="no safetensors file"):
        W.load_safetensors(tmp_path / "nowhere")


def test_disk_store_keeps_last_versions(models, tmp_path):
    store = W.DiskStore(tmp_path, keep=2)
    paths = [store.save(models[0].state_dict(), v) for v in (1, 2, 3)]
    assert not paths[0].exists() and paths[1].exists() and paths[2].exists()
    assert paths[2].name == "v00000003" and (paths[2] / "model.safetensors").exists()


def test_flat_buffers_view_every_tensor(models):
    sd = W.unique_tensors(models[1].state_dict())
    flats, views = W._buffers(W.flat_spec(sd))
    assert list(flats) == ["float32"] and flats["float32"].numel() == sum(v.numel() for v in sd.values())
    for k, v in sd.items():
        views[k].copy_(v)
    off = 0
    for k, v in sd.items():  # views are laid out in order, without gaps
        assert torch.equal(flats["float32"][off: off + v.numel()].view(v.shape), v)
        off += v.numel()


def test_in_process_memory_and_disk_sync(models, tok, tmp_path):
    eng = EmbeddedEngine(models[0], tokenizer=tok)
    try:
        mem = W.make_weight_sync("memory", [eng])
        assert type(mem) is W.WeightSync and mem.name == "memory"
        mem.push(models[1].state_dict(), 1)
        check_serves(eng, models[1], tok, 1)
        disk = W.make_weight_sync("disk", [eng], tmp_path)
        disk.push(models[0].state_dict(), 2)
        check_serves(eng, models[0], tok, 2)
        assert (tmp_path / "v00000002" / "model.safetensors").exists()
        with pytest.raises(ValueError, match="weight_sync=shm: needs an engine process"):
            W.make_weight_sync("shm", [eng])
        eng.load_weights(str(tmp_path / "v00000002"), 3)  # a safetensors directory, read in this process
        check_serves(eng, models[0], tok, 3)
    finally:
        eng.close()


def test_disk_sync_to_a_server_via_update_weights_from_disk(models, tok, tmp_path):
    from thinkrl.rollout.remote import RemoteEngine
    from thinkrl.rollout.server import Server

    local = build_micro_model(tok, seed=0).eval()  # the server's own copy
    eng = EmbeddedEngine(local, tokenizer=tok)
    server = Server(eng, tok, model=local, port=0)
    port = server.start()
    try:
        remote = RemoteEngine([f"http://127.0.0.1:{port}"], tokenizer=tok)
        sync = W.make_weight_sync("disk", [remote], tmp_path)
        sync.push(models[1].state_dict(), 4)  # safetensors -> /update_weights_from_disk
        assert eng.version == 4 and remote.version == 4
        check_serves(eng, models[1], tok, 4)
    finally:
        server.stop()
        eng.close()


def test_bad_names_are_clear_errors(models, tok):
    with pytest.raises(ValueError, match="rollout.weight_sync: unknown value 'carrier'"):
        W.make_weight_sync("carrier", [])
    with pytest.raises(ValueError, match="transport must be one of"):
        ProcessEngine(models[0], tok, transport="pigeon")


@pytest.mark.parametrize("transport", ["shm", "disk", "dist", "pipe"])
def test_process_engine_transports(proc, models, tok, transport):
    proc.transport = transport
    proc.load_weights(models[1].state_dict(), 7)
    assert proc.version == 7
    check_serves(proc, models[1], tok, 7)
    proc.load_weights(models[0], 8)  # an nn.Module works too
    check_serves(proc, models[0], tok, 8)


@pytest.mark.parametrize("kind", ["shm", "dist", "disk"])
def test_weight_sync_kinds_on_an_engine_process(proc, models, tok, kind):
    proc.transport = "pipe"
    if kind != "disk":  # the engine process must be loading through that channel already
        with pytest.raises(ValueError, match=f"weight_sync={kind}: .* loads through pipe"):
            W.make_weight_sync(kind, [proc])
        proc.transport = kind
    sync = W.make_weight_sync(kind, [proc])
    try:
        sync.push(models[1].state_dict(), 11)
        check_serves(proc, models[1], tok, 11)
        sync.push(models[0].state_dict(), 12)
        check_serves(proc, models[0], tok, 12)
    finally:
        sync.close()


def test_bad_requests_are_value_errors(proc, models, tok):
    with pytest.raises(ValueError, match="SamplingParams.max_new_tokens"):
        proc.generate_batch([tok.encode("hi")], SamplingParams(max_new_tokens=0))
    with pytest.raises(ValueError, match="update_weights: unknown parameter 'nope.weight'"):
        proc.call("load", ("pipe", {"nope.weight": torch.zeros(1)}), 99)  # the pipe transport's message
    check_serves(proc, models[0], tok, proc.version)  # still serving


def test_versions_change_mid_sequence_across_an_update(proc, models, tok):
    proc.transport = "shm"
    proc.load_weights(models[0].state_dict(), 20)
    p = tok.encode("partial rollout")

    async def run():
        task = asyncio.ensure_future(proc.generate(p, SamplingParams(max_new_tokens=200, seed=3), n=2))
        for _ in range(8000):  # wait until the sequences have a few tokens
            await asyncio.sleep(0.001)
            if proc.call("progress") >= 3:
                break
        # Hold the engine at a token boundary first: copying the weights in takes longer than the rest of
        # the 200 tokens on a fast machine, and the update must land mid-sequence. The load's own
        # pause -> update -> resume then resumes it.
        proc.pause()
        assert 3 <= proc.call("progress") < 200
        proc.load_weights(models[1].state_dict(), 21)
        return await task

    for g in asyncio.run(run()):
        k = g.versions.index(21)
        assert len(g.tokens) == 200 and 3 <= k < 200
        assert g.versions == [20] * k + [21] * (200 - k)


def test_dead_engine_process_raises(models, tok):
    eng = ProcessEngine(models[0], tok)
    eng._proc.kill()
    eng._proc.join()
    deadline = time.time() + 10
    while eng._reader.is_alive() and time.time() < deadline:
        time.sleep(0.01)
    with pytest.raises(EngineProcessError):
        eng.generate_batch([tok.encode("hi")], SamplingParams(max_new_tokens=2))
    eng.close()
