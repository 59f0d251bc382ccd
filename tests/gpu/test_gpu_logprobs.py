"""On the device: the embedded engine's log-probs equal the trainer's forward on the engine's own samples.

Tolerances (|engine - trainer| over every response token):
- float32: max <= 1e-3 (TF32 is off by default, so both sides compute in fp32; they differ in kernels and
  summation order only: measured ~1e-6 on the CPU);
- bfloat16 (engine in bf16 weights, trainer under bf16 autocast): mean <= 0.02 and max <= 0.1 (bf16 keeps
  8 bits of mantissa: logits of a few units carry ~1e-2 of rounding, and the two sides round at different
  places: RMSNorm and softmax run in fp32 in both, the residual stream in bf16 in the engine only; measured
  mean 2e-3, max 8e-3 on the CPU).
The bf16 case also checks that its engine, compared with the fp32 trainer, misses the fp32 tolerance: the
float32 test can tell a bf16 engine from an fp32 one.
"""
from __future__ import annotations

import random

import pytest
import torch

from thinkrl.algo.config import AlgoConfig
from thinkrl.config import TrainConfig
from thinkrl.models.micro import build_micro_model
from thinkrl.rollout.engine import EmbeddedEngine
from thinkrl.train.engine import TrainEngine
from thinkrl.types import SamplingParams, Trajectory

pytestmark = pytest.mark.gpu
TOL_FP32 = 1e-3
TOL_BF16_MEAN, TOL_BF16_MAX = 0.02, 0.1


def _model(tok, device):
    return build_micro_model(tok, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=768,
                             max_position=160, seed=0).to(device)


def _samples(tok, engine, n_prompts: int = 8, n: int = 4, new: int = 48) -> list[Trajectory]:
    rng = random.Random(0)
    first = len(tok) - 100  # printable characters
    prompts = [[rng.randrange(first, len(tok)) for _ in range(rng.randint(8, 40))] for _ in range(n_prompts)]
    groups = engine.generate_batch(prompts, SamplingParams(max_new_tokens=new, temperature=1.0, seed=0), n=n)
    trajs = []
    for i, (p, gens) in enumerate(zip(prompts, groups)):
        for g in gens:
            r = len(g.tokens)
            trajs.append(Trajectory(sample_id=f"s{i}", group_id=f"g{i}", tokens=p + g.tokens,
                                    loss_mask=[False] * len(p) + [True] * r, logprobs=[0.0] * len(p) + g.logprobs,
                                    versions=[-1] * len(p) + [0] * r, prompt_len=len(p)))
    return trajs


def _diffs(trainer: TrainEngine, trajs: list[Trajectory]) -> torch.Tensor:
    ref = trainer.logprobs(trajs)
    d = [abs(a - b) for t, lp in zip(trajs, ref) for a, b, m in zip(t.logprobs, lp, t.loss_mask) if m]
    return torch.tensor(d, dtype=torch.float64)


def _trainer(model, bf16: bool) -> TrainEngine:
    return TrainEngine(model, TrainConfig(max_tokens_per_mb=4096), AlgoConfig(), autocast_bf16=bf16)


def test_engine_logprobs_match_the_trainer_fp32(device, tok, report):
    model = _model(tok, device)
    engine = EmbeddedEngine(model, tok, max_seqs=64, max_len=160, dtype="float32", stop_at_eos=False)
    assert engine.device.type == device.type
    trajs = _samples(tok, engine)
    engine.close()
    d = _diffs(_trainer(model, bf16=False), trajs)
    report("logprobs_fp32", {"device": str(device), "tokens": len(d), "max_abs_diff": d.max().item(),
                             "mean_abs_diff": d.mean().item(), "tolerance_max": TOL_FP32})
    assert len(d) == 8 * 4 * 48
    assert d.max() <= TOL_FP32, f"fp32 engine vs trainer: max |dlogp| = {d.max():.2e} > {TOL_FP32}"


def test_engine_logprobs_match_the_trainer_bf16(device, tok, report, need_bf16):
    need_bf16()
    model = _model(tok, device)
    engine = EmbeddedEngine(model, tok, max_seqs=64, max_len=160, dtype="bfloat16", stop_at_eos=False)
    trajs = _samples(tok, engine)
    engine.close()
    d = _diffs(_trainer(model, bf16=True), trajs)
    d32 = _diffs(_trainer(model, bf16=False), trajs)
    report("logprobs_bf16", {"device": str(device), "tokens": len(d), "max_abs_diff": d.max().item(),
                             "mean_abs_diff": d.mean().item(), "tolerance_mean": TOL_BF16_MEAN,
                             "tolerance_max": TOL_BF16_MAX, "vs_fp32_trainer_max_abs_diff": d32.max().item()})
    assert d.mean() <= TOL_BF16_MEAN and d.max() <= TOL_BF16_MAX, \
        f"bf16 engine vs bf16 trainer: mean {d.mean():.2e}, max {d.max():.2e}"
    assert d32.max() > TOL_FP32  # the fp32 tolerance would catch a bf16 engine
