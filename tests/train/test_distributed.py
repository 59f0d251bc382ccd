"""Data parallel (thinkrl.train.distributed) under gloo: 2 ranks == 1 process, for gradients and for the RL loop."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # spawned ranks import the helpers below by module name

from test_split_invariance import TOL, grads_after_step, make_batch, tiny_model  # noqa: E402

from thinkrl.algo.config import AlgoConfig  # noqa: E402
from thinkrl.config import TrainConfig, load_config  # noqa: E402
from thinkrl.models.micro import build_tokenizer  # noqa: E402
from thinkrl.tasks.arithmetic import Arithmetic  # noqa: E402
from thinkrl.system.launch import run_train  # noqa: E402
from thinkrl.train import distributed as dp  # noqa: E402
from thinkrl.train.engine import TrainEngine  # noqa: E402

START = "fork"


# ----------------------------------------------------------------------------- rank bodies (run in child processes)
def _grads(model) -> dict:
    return {k.removeprefix("module."): dp.full_value(p.grad).detach().clone() for k, p in model.named_parameters()}


def _sft_examples(batch):
    return [(t.tokens, t.loss_mask) for t in batch.trajectories]


def _grad_rank(rank: int, world_size: int, mode: str, loss_aggs: list[str], budget: int, out: str) -> None:
    """Every rank: the same batch (SPMD), its own micro-batches; saves grads, metrics, log-probs, its sequences."""
    ctx = dp.init_distributed(world_size, rank, mode=mode, device="cpu")
    try:
        tok = build_tokenizer()
        batch = make_batch(len(tok))
        res = {}
        for agg in loss_aggs:
            tcfg = TrainConfig(max_tokens_per_mb=budget, grad_clip=0.0)
            eng = TrainEngine(tiny_model(tok), tcfg, AlgoConfig(loss_agg=agg, lr=1e-3, clip_high=0.28), dist=ctx)
            mine = [i for g, _ in eng.micro_batches(batch.trajectories, share_prompt=True) for i in g]
            lps = eng.logprobs(batch.trajectories)
            m = eng.step(batch)
            res[agg] = {"grads": _grads(eng.model), "metrics": m, "seqs": mine, "logprobs": lps}
        eng = TrainEngine(tiny_model(tok), TrainConfig(max_tokens_per_mb=budget, grad_clip=0.0), AlgoConfig(), dist=ctx)
        m = eng.sft_step(_sft_examples(batch))
        res["sft"] = {"grads": _grads(eng.model), "metrics": m}
        torch.save(res, f"{out}.{rank}")
    finally:
        dp.shutdown()


def _failing_rank(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("rank one is broken")


# ----------------------------------------------------------------------------- gradients
AGGS = ["token-mean", "seq-mean-token-mean"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _check_same_grads(tok, tmp_path, mode):
    batch = make_batch(len(tok))
    refs = {agg: grads_after_step(tok, batch, 4096, agg) for agg in AGGS}  # first: forked ranks inherit the imports
    out = str(tmp_path / "res")
    dp.launch(_grad_rank, 2, mode, AGGS, 48, out, start_method=START, threads=1)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    for agg in AGGS:
        ref, ref_m, _ = refs[agg]
        seqs = [ranks[r][agg]["seqs"] for r in range(2)]
        assert seqs[0] and seqs[1] and sorted(seqs[0] + seqs[1]) == list(range(len(batch)))  # a real split
        ref_lp = TrainEngine(tiny_model(tok), TrainConfig(), AlgoConfig()).logprobs(batch.trajectories)
        for r in range(2):
            diff = _max_diff(ranks[r][agg]["grads"], ref)
            assert diff <= TOL, f"{mode} {agg} rank {r}: max |grad - grad(1 process)| = {diff:.2e}"
            m = ranks[r][agg]["metrics"]
            assert abs(m["loss/policy"] - ref_m["loss/policy"]) <= TOL
            assert abs(m["grad/norm"] - ref_m["grad/norm"]) <= TOL * max(1.0, ref_m["grad/norm"])
            lps = ranks[r][agg]["logprobs"]  # every rank gets every sequence's log-probs
            assert max(abs(x - y) for a, b in zip(lps, ref_lp) for x, y in zip(a, b)) <= TOL
    ref_eng = TrainEngine(tiny_model(tok), TrainConfig(grad_clip=0.0), AlgoConfig())
    ref_m = ref_eng.sft_step(_sft_examples(batch))
    for r in range(2):
        assert _max_diff(ranks[r]["sft"]["grads"], _grads(ref_eng.model)) <= TOL
        assert abs(ranks[r]["sft"]["metrics"]["loss/sft"] - ref_m["loss/sft"]) <= TOL


def test_ddp_two_ranks_same_gradients_as_one_process(tok, tmp_path):
    _check_same_grads(tok, tmp_path, "ddp")


def test_fsdp2_two_ranks_same_gradients_as_one_process(tok, tmp_path):
    _check_same_grads(tok, tmp_path, "fsdp2")


# ----------------------------------------------------------------------------- the RL loop
class DigitShare(Arithmetic):
    """Arithmetic problems, rewarded by the share of digits in the response: an untrained model's samples get
    varied rewards, so advantages, losses and gradients are not all zero (a binary reward would be 0 everywhere)."""

    reward_isolation = "inline"  # a count of characters: cannot hang (no reward worker processes to start)

    def reward(self, response: str, sample) -> float:
        return sum(c.isdigit() for c in response) / max(1, len(response))


TINY = ["task.name=test_distributed:DigitShare", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
        "model.intermediate_size=64", "data.num_train=64", "data.num_eval=4", "rollout.n=2",
        "rollout.batch_prompts=4", "rollout.max_new_tokens=8", "eval.k=0", "log.progress=false",
        "rollout.engine=hf", "algo.lr=0.01", "run.threads=1", "train.max_tokens_per_mb=64",
        "train.grad_clip=0.5"]  # grad norms are ~0.6-0.8 here: clipping is active


def _records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(out: Path, step: int) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "checkpoints" / f"step_{step:06d}" / "model.safetensors"))


def _run_rl(out: Path, world_size: int, *extra, resume: bool = False) -> dict:
    cfg = load_config(None, TINY + [f"run.output_dir={out}", f"train.world_size={world_size}", *extra])
    return run_train(cfg, resume=resume, start_method=START)


def _assert_same_run(a: Path, b: Path, steps: int) -> None:
    ra, rb = _records(a), _records(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == list(range(1, steps + 1))
    # a real signal (the on-policy loss value itself is ~0 when every response has the same length)
    assert all(r["grad/norm"] > 1e-4 for r in ra)
    for x, y in zip(ra, rb):
        # same trajectories (rank 0 generated exactly what the single process did) ...
        assert x["reward/mean"] == y["reward/mean"] and x["len/response_mean"] == y["len/response_mean"]
        # ... and the same loss and update
        assert abs(x["loss/policy"] - y["loss/policy"]) <= TOL, (x["step"], x["loss/policy"], y["loss/policy"])
        assert abs(x["grad/norm"] - y["grad/norm"]) <= 1e-4 * max(1.0, x["grad/norm"])
    wa, wb = _weights(a, steps), _weights(b, steps)
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= TOL


def test_ddp_rl_loop_matches_one_process(tmp_path):
    """Two PPO epochs per batch: rank 0 also hands the old-log-prob recompute (trainer.logprobs) to rank 1."""
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = _run_rl(one, 1, "train.steps=2", "algo.ppo_epochs=2")
    r2 = _run_rl(two, 2, "train.steps=2", "algo.ppo_epochs=2")
    assert r1["steps"] == r2["steps"] == 2
    _assert_same_run(one, two, 2)
    assert r1 == {**r2, **{k: r1[k] for k in r1 if k.startswith("perf")}}


def test_fsdp2_rl_loop_matches_one_process(tmp_path):
    """FSDP2 shards the trainer; rank 0's engine gets the gathered full weights after every step."""
    one, two = tmp_path / "one", tmp_path / "two"
    _run_rl(one, 1, "train.steps=2")
    _run_rl(two, 2, "train.steps=2", "train.parallel=fsdp2")
    _assert_same_run(one, two, 2)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_rank_resume_continues_exactly(tmp_path, mode):
    """Checkpoint at step 1 (optimizer state gathered to rank 0), resume on 2 ranks to step 3 == 3 steps in one process."""
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    _run_rl(straight, 1, "train.steps=3")
    _run_rl(interrupted, 2, "train.steps=1", "train.save_every=1", f"train.parallel={mode}")
    _run_rl(interrupted, 2, "train.steps=3", f"train.parallel={mode}", resume=True)
    _assert_same_run(straight, interrupted, 3)


# ----------------------------------------------------------------------------- errors (no processes)
def test_a_failing_rank_is_reported():
    with pytest.raises(RuntimeError, match="rank 1 failed: ValueError: rank one is broken"):
        dp.launch(_failing_rank, 2, start_method=START)


def test_bad_settings_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="train.parallel: unknown value 'zero3'"):
        dp.init_distributed(2, 0, mode="zero3", port=1)
    with pytest.raises(ValueError, match="rank=2 outside"):
        dp.init_distributed(2, 2, port=1)
    with pytest.raises(RuntimeError, match="no process group"):
        dp.wrap_model(torch.nn.Linear(2, 2))

    def cfg(*extra):
        return load_config(None, TINY + [f"run.output_dir={tmp_path}", "train.world_size=2", *extra])

    with pytest.raises(ValueError, match="train.world_size > 1: data-parallel training runs with"):
        cfg("rollout.max_staleness=1", "algo.loss=decoupled_ppo", "rollout.engine=embedded")
    with pytest.raises(ValueError, match="train.packing=false"):
        run_train(cfg("train.packing=false"))
    with pytest.raises(ValueError, match="--resume: no checkpoint"):
        run_train(cfg(), resume=True)
    with pytest.raises(ValueError, match="train.parallel: unknown value 'zero3'; valid: ddp, fsdp2"):
        cfg("train.parallel=zero3")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="train.world_size=2 but torchrun started WORLD_SIZE=3"):
        run_train(cfg())


# ----------------------------------------------------------------------------- fresh processes (what users run)
@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["spawn", "torchrun"])
def test_rl_loop_in_fresh_processes(tmp_path, launcher):
    """`launch` with the default start method (spawn), and torchrun (env:// rendezvous, RANK/WORLD_SIZE): each
    rank imports everything afresh (~30 s or more on a loaded 2-core machine), hence slow."""
    import subprocess

    one, two = tmp_path / "one", tmp_path / "two"
    _run_rl(one, 1, "train.steps=2")
    if launcher == "spawn":
        cfg = load_config(None, TINY + [f"run.output_dir={two}", "train.world_size=2", "train.steps=2"])
        run_train(cfg)  # start_method="spawn"
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(dp.free_port()), __file__, str(two), "train.steps=2"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, res.stderr[-3000:]
    _assert_same_run(one, two, 2)


if __name__ == "__main__":  # torchrun --nproc-per-node 2 tests/train/test_distributed.py OUT_DIR [overrides]
    run_train(load_config(None, TINY + [f"run.output_dir={sys.argv[1]}", *sys.argv[2:]]))
