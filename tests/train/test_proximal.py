"""decoupled PPO with one epoch: the trainer takes the proximal log-probs from the step's own forward; that is
the same step as with proximal log-probs recomputed by a separate no-grad pass."""
import copy

import pytest
import torch

from thinkrl.algo.batch import make_batch
from thinkrl.config import load_config
from thinkrl.system.setup import build_run
from thinkrl.train.engine import TrainEngine
from thinkrl.types import Trajectory

TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
        "model.intermediate_size=64", "data.num_train=20", "data.num_eval=4", "run.threads=1",
        "algo.loss=decoupled_ppo", "algo.behav_weight_cap=5.0", "algo.lr=0.01"]


def _trajs():
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(6):
        n = 5 + i
        toks = torch.randint(3, 50, (n,), generator=g).tolist()
        behav = (-5 - torch.rand(n - 2, generator=g) * 3).tolist()  # the engine's log-probs: far from the trainer's
        out.append(Trajectory(f"s{i // 3}", f"g{i // 3}", toks, [False] * 2 + [True] * (n - 2), [0.0] * 2 + behav,
                              [-1] * 2 + [0] * (n - 2), reward=float(i % 2), prompt_len=2))
    return out


def test_inline_proximal_equals_recomputed_proximal():
    cfg = load_config(None, TINY)
    model = build_run(cfg).model
    a, b = TrainEngine(copy.deepcopy(model), cfg.train, cfg.algo), TrainEngine(copy.deepcopy(model), cfg.train, cfg.algo)
    trajs = _trajs()
    batch = make_batch(trajs, cfg.algo, 16)
    ma = a.step(batch)  # proximal from the step's own forward
    mb = b.step(batch, old_logprobs=b.logprobs(trajs))  # proximal from a separate pass
    assert ma["loss/policy"] == pytest.approx(mb["loss/policy"], abs=1e-6)
    assert ma["is/behav_weight_max"] == pytest.approx(mb["is/behav_weight_max"], rel=1e-5)
    assert ma["is/behav_weight_max"] > 1.5  # the behaviour weight is really in play
    for (k, wa), wb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.allclose(wa, wb, atol=1e-6), k
    c = TrainEngine(copy.deepcopy(model), cfg.train, cfg.algo)
    mc = c.step(batch, old_logprobs=[t.logprobs for t in trajs])  # proximal = behaviour: another objective
    assert abs(mc["loss/policy"] - ma["loss/policy"]) > 1e-4
