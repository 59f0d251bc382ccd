"""On the device: the gradient of a batch does not depend on its micro-batch split (packed and padded), and a
local normaliser would be caught; a few RL steps of the one loop, synchronous (fp32 and bf16 autocast) and
asynchronous (max_staleness=1, the engine in its own process), finish with finite losses.

Split tolerance: max |grad(1 micro-batch) - grad(4)| <= 1e-5 x max(1, max |grad|) (the CPU test's 1e-5, scaled
by the gradient's size: on a GPU the reductions of differently shaped micro-batches sum in other orders).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
from test_split_invariance import make_batch  # noqa: E402

from thinkrl.algo import registry  # noqa: E402
from thinkrl.algo.config import AlgoConfig  # noqa: E402
from thinkrl.config import TrainConfig, load_config  # noqa: E402
from thinkrl.models.micro import build_micro_model  # noqa: E402
from thinkrl.system.train import train_rl  # noqa: E402
from thinkrl.train.engine import TrainEngine  # noqa: E402

pytestmark = pytest.mark.gpu
TOL = 1e-5


def _grads(tok, device, batch, budget: int, packing: bool = True):
    tcfg = TrainConfig(max_tokens_per_mb=budget, packing=packing, share_prompt=packing, grad_clip=0.0)
    acfg = AlgoConfig(loss_agg="token-mean", lr=1e-3, clip_low=0.2, clip_high=0.28)
    model = build_micro_model(tok, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                              seed=0).to(device)
    eng = TrainEngine(model, tcfg, acfg)
    n_mb = len(eng.micro_batches(batch.trajectories, share_prompt=packing))
    eng.step(batch)
    return {k: p.grad.detach().double().cpu() for k, p in eng.model.named_parameters()}, n_mb


def _max_diff(a: dict, b: dict) -> tuple[float, float]:
    scale = max(1.0, max(float(g.abs().max()) for g in a.values()))
    return max(float((a[k] - b[k]).abs().max()) for k in a), scale


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_gradient_independent_of_micro_batch_split(device, tok, packing, report):
    batch = make_batch(len(tok))
    longest = max(len(t.tokens) for t in batch.trajectories)
    whole, n1 = _grads(tok, device, batch, 4096, packing)
    split, n = _grads(tok, device, batch, longest, packing)
    assert n1 == 1 and n > 1
    diff, scale = _max_diff(whole, split)
    report(f"split_invariance_{'packed' if packing else 'padded'}",
           {"device": str(device), "micro_batches": n, "max_abs_grad_diff": diff, "max_abs_grad": scale,
            "tolerance": TOL * scale})
    assert sum(float(g.abs().sum()) for g in whole.values()) > 1e-3  # a real gradient
    assert diff <= TOL * scale, f"max |grad(1 mb) - grad({n} mbs)| = {diff:.2e}"


def test_local_normaliser_would_be_caught(device, tok, monkeypatch):
    def local_token_mean(per_token, inp, cfg=None):
        return (per_token * inp.mask).sum() / inp.mask.sum().clamp(min=1.0)

    monkeypatch.setitem(registry.LOSS_AGGS, "token-mean", local_token_mean)
    batch = make_batch(len(tok))
    whole, _ = _grads(tok, device, batch, 4096)
    split, n = _grads(tok, device, batch, max(len(t.tokens) for t in batch.trajectories))
    diff, scale = _max_diff(whole, split)
    assert n > 1 and diff > 100 * TOL * scale


TINY = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
        "model.intermediate_size=128", "data.num_train=200", "data.num_eval=16", "rollout.n=4",
        "rollout.batch_prompts=4", "rollout.max_new_tokens=12", "eval.k=0", "log.progress=false", "algo.lr=0.01",
        "algo.entropy_coef=0.01"]  # an untrained model earns no reward: the entropy bonus makes each update real


def _run(tmp_path, device, extra: list[str]) -> list[dict]:
    cfg = load_config(None, TINY + [f"run.device={device}", f"run.output_dir={tmp_path}"] + extra)
    res = train_rl(cfg)
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "loss/policy" in r]
    assert res["steps"] == cfg.train.steps and [r["step"] for r in recs] == list(range(1, cfg.train.steps + 1))
    assert all(math.isfinite(r["loss/policy"]) and math.isfinite(r["grad/norm"]) and r["grad/norm"] > 0 for r in recs)
    return recs


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
def test_sync_rl_steps(device, tmp_path, amp, report, need_bf16):
    if amp:
        
        need_bf16()
    recs = _run(tmp_path, device, ["train.steps=3", f"model.autocast_bf16={str(amp).lower()}"])
    assert all(r["staleness/max"] == 0 for r in recs)
    report(f"rl_sync_{'bf16' if amp else 'fp32'}", {"device": str(device), "steps": len(recs),
                                                    "reward_mean": [r["reward/mean"] for r in recs],
                                                    "grad_norm": [r["grad/norm"] for r in recs]})


def test_async_rl_steps_with_the_engine_in_its_own_process(device, tmp_path, report):
    recs = _run(tmp_path, device, ["train.steps=4", "rollout.max_staleness=1", "algo.loss=decoupled_ppo",
                                   "rollout.placement=process"])
    assert all(r["staleness/max"] <= 1 for r in recs) and "is/behav_weight_max" in recs[-1]
    report("rl_async", {"device": str(device), "steps": len(recs),
                        "staleness_mean": [r["staleness/mean"] for r in recs],
                        "reward_mean": [r["reward/mean"] for r in recs]})


@pytest.mark.parametrize("eta", [0, 1])
def test_deterministic_runs_repeat_on_the_device(device, tmp_path, eta, report):
    """run.deterministic: two runs give the same metrics bit for bit, on the device too."""
    over = ["train.steps=3", "run.deterministic=true", f"rollout.max_staleness={eta}", "algo.loss=decoupled_ppo",
            "rollout.placement=inline"]
    a = _run(tmp_path / "a", device, over)
    b = _run(tmp_path / "b", device, over)
    keep = [k for k in a[0] if not k.startswith(("perf/", "buffer/")) and k != "time"]
    diff = {k: max(abs(x[k] - y[k]) for x, y in zip(a, b)) for k in keep if isinstance(a[0][k], (int, float))}
    report(f"deterministic_eta{eta}", {"device": str(device), "steps": len(a),
                                       "max_metric_diff": max(diff.values()),
                                       "differing": sorted(k for k, v in diff.items() if v != 0)})
    assert all(v == 0 for v in diff.values()), {k: v for k, v in diff.items() if v != 0}
