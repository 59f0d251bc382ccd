"""thinkrl.system.async_: the staleness bound (hand-computed cases, property tests with random speeds),
η = 0 reproduces the sync loop, and a run with the engine in its own process."""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from thinkrl.algo.config import AlgoConfig
from thinkrl.algo.losses import LossInput, decoupled_ppo, decoupled_ppo_inline
from thinkrl.config import load_config
from thinkrl.rollout.base import EngineCaps, InferenceEngine
from thinkrl.system.async_ import (AsyncOptions, StalenessBuffer, async_algo_config,
                                   group_seed, needs_old_logprobs, run_async, run_rl, staleness_metrics)
from thinkrl.system.setup import build_run, make_inference_engine, make_workflow
from thinkrl.system.sync import run_sync
from thinkrl.train.engine import TrainEngine
from thinkrl.types import Generation, Sample, Trajectory

TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
        "model.intermediate_size=64", "data.num_train=200", "data.num_eval=16", "rollout.n=4",
        "rollout.batch_prompts=4", "rollout.max_new_tokens=12", "eval.k=0", "log.progress=false",
        "algo.lr=0.01", "run.threads=1"]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- the buffer, by hand
def test_admission_counts_groups_up_to_eta_plus_v_plus_1_batches():
    buf = StalenessBuffer(batch_groups=2, eta=1)
    started = [buf.try_start() for _ in range(5)]
    assert [g.index for g in started[:4]] == [0, 1, 2, 3] and started[4] is None  # (1 + 0 + 1) x 2 = 4
    assert {g.version for g in started[:4]} == {0}
    buf.advance(1)
    assert buf.try_start().index == 4 and buf.try_start().index == 5 and buf.try_start() is None
    resumed = StalenessBuffer(batch_groups=2, eta=0, start_step=3, version=3)  # resume at step 3
    assert [resumed.try_start().index for _ in range(2)] == [6, 7] and resumed.try_start() is None


def test_trainer_waits_rather_than_strand_an_old_group():
    # η = 2, B = 1: g0, g1, g2 start at version 0; g2 finishes first and is trained (v -> 1); g3 starts at v1 and
    # finishes. Training g3 now would leave g0 and g1 (both due by version 2) for the single batch at version 2:
    # the buffer must wait for g0 instead.
    buf = StalenessBuffer(batch_groups=1, eta=2)
    g = [buf.try_start() for _ in range(3)]
    assert buf.try_start() is None
    buf.finish(g[2], ["t2"])
    assert [x.index for x in buf.take()] == [2]
    buf.advance(1)
    g3 = buf.try_start()
    buf.finish(g3, ["t3"])
    assert buf.pick() is None  # oldest-first would have taken g3
    buf.finish(g[0], ["t0"])
    assert [x.index for x in buf.take()] == [0]
    buf.advance(2)
    assert buf.pick() is None  # g1 (deadline now) is not finished: nothing else may go first
    buf.finish(g[1], ["t1"])
    assert [x.index for x in buf.take()] == [1]


def test_eta0_takes_exactly_the_sync_batches_in_order():
    buf = StalenessBuffer(batch_groups=3, eta=0)
    for step in range(3):
        gs = [buf.try_start() for _ in range(3)]
        assert buf.try_start() is None
        for x in reversed(gs):
            assert buf.pick() is None or x is gs[0]
            buf.finish(x, [x.index])
        assert [x.index for x in buf.take()] == [3 * step, 3 * step + 1, 3 * step + 2]
        buf.advance(step + 1)


def test_adaptive_admission_keeps_one_batch_ahead_while_the_trainer_finds_data_ready():
    B = 2
    buf = StalenessBuffer(batch_groups=B, eta=2, adaptive=True)
    gs = [buf.try_start() for _ in range(6)]  # eager at first: the whole bound, (2 + 0 + 1) x 2
    assert buf.try_start() is None and not buf.lazy
    for g in gs:
        buf.finish(g, ["t"])
    for v in (1, 2):  # two takes that find their batch ready
        buf.take()
        buf.advance(v)
    assert buf.lazy and len(buf.groups) == B
    assert buf.try_start() is None  # the bound would allow 4 more; one batch is already started ahead
    buf.take()
    buf.advance(3)
    new = [buf.try_start() for _ in range(B)]
    assert all(new) and buf.try_start() is None  # one batch ahead, started at the current version
    assert {g.version for g in new} == {3}
    lifted = []
    buf.on_lift = lambda: lifted.append(buf.lazy)
    with pytest.raises(TimeoutError):
        buf.take(timeout=0.01)  # the trainer has to wait: generation is behind
    assert lifted == [False] and not buf.lazy
    assert sum(buf.try_start() is not None for _ in range(10)) == (2 + 3 + 1) * B - 8  # the full bound again


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 3), st.integers(0, 3), st.integers(0, 2**32 - 1), st.integers(3, 8), st.booleans())
def test_staleness_bound_with_random_speeds(B, eta, seed, steps, adaptive):
    """Random generation speeds (finish order, how much finishes between trainer looks) and training speeds:
    the trainer never takes a group older than η, admission never exceeds the bound, and it never deadlocks
    (eager and adaptive admission)."""
    rnd = random.Random(seed)
    buf = StalenessBuffer(B, eta, adaptive=adaptive)
    in_flight: list = []
    version = 0
    while version < steps:
        lazy, n0, i0, bound = buf.lazy, len(buf.groups), buf.next_index, (eta + version + 1) * B
        while (g := buf.try_start()) is not None:  # the producer starts everything it may
            in_flight.append(g)
        assert buf.next_index <= bound
        assert buf.next_index - i0 == (max(0, min(B - n0, bound - i0)) if lazy else bound - i0)
        for _ in range(rnd.randint(0, len(in_flight))):  # a random subset finishes, in random order
            buf.finish(in_flight.pop(rnd.randrange(len(in_flight))), ["t"])
        if rnd.random() < 0.5:  # the trainer is slow: it does not look this time
            continue
        batch = buf.pick()
        if batch is None:
            assert in_flight, "nothing in flight and no batch: deadlock"
            with pytest.raises(TimeoutError):
                buf.take(timeout=0)  # the trainer waits (and adaptive admission opens the bound)
            assert not buf.lazy
            continue
        buf.take()
        assert len(batch) == B and all(version - x.version <= eta for x in batch)
        if eta == 0:
            assert [x.index for x in batch] == list(range(version * B, (version + 1) * B))
        version += 1
        buf.advance(version)


# ----------------------------------------------------------------------------- the controller, with fakes
class FakeEngine(InferenceEngine):
    """Tokens come one at a time with random delays; each carries the version loaded when it was produced."""

    caps = EngineCaps(in_process=True, pause_modes=("in_place",), transports=("memory",), mid_sequence_update=True)

    def __init__(self, rnd: random.Random, max_delay: float):
        super().__init__()
        self.rnd, self.max_delay = rnd, max_delay

    @classmethod
    def from_config(cls, cfg, model, tokenizer, version=0):
        raise NotImplementedError

    async def generate(self, input_ids, params, n=1):
        out = []
        for _ in range(n):
            toks, vers = [], []
            for _ in range(self.rnd.randint(1, 4)):
                await asyncio.sleep(self.rnd.random() * self.max_delay)
                toks.append(5)
                vers.append(self.version)
            out.append(Generation(toks, [-1.0] * len(toks), vers, "stop"))
        return out

    def pause(self, mode=None): ...

    def resume(self): ...

    def update_weights(self, sd, version):
        self.version = version


class FakeWorkflow:
    async def run_episode(self, engine, sample, group_id=None):
        gens = await engine.generate([1, 2], None, 2)
        return [Trajectory(sample.id, group_id, [1, 2] + g.tokens, [False] * 2 + [True] * len(g.tokens),
                           [0.0] * 2 + g.logprobs, [-1, -1] + g.versions, reward=float(i), prompt_len=2)
                for i, g in enumerate(gens)]


class FakeTrainer:
    def __init__(self, rnd: random.Random, max_delay: float, eta: int):
        self.version, self.acfg, self.rnd, self.max_delay, self.eta = 0, AlgoConfig(), rnd, max_delay, eta
        self.seen: list[int] = []

    def logprobs(self, trajs):
        return [t.logprobs for t in trajs]

    def step(self, batch, old_logprobs=None):
        for t in batch.trajectories:  # checked here, independently of the controller's own metric
            self.seen.append(self.version - min(v for v in t.versions if v >= 0))
        time.sleep(self.rnd.random() * self.max_delay)
        self.version += 1
        return {"perf/train_tokens": float(batch.num_tokens)}

    def export_weights(self):
        return {}


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 3), st.integers(1, 3), st.integers(0, 2**32 - 1), st.sampled_from([1e-4, 2e-3]),
       st.sampled_from([0.0, 5e-3]))
def test_controller_never_trains_beyond_eta(eta, B, seed, gen_delay, train_delay):
    cfg = load_config(None, [f"rollout.batch_prompts={B}", f"rollout.max_staleness={eta}", "rollout.mode=async"])
    rnd = random.Random(seed)
    samples = [Sample(id=str(i), prompt="p", answer=None) for i in range(50)]
    trainer = FakeTrainer(rnd, train_delay, eta)
    ms = []
    last = run_async(cfg, FakeEngine(rnd, gen_delay), FakeWorkflow(), trainer, samples, 0, 6,
                     lambda s, m: ms.append(m), options=AsyncOptions(placement="inline"))
    assert last == 6 and len(trainer.seen) == 6 * B * 2
    assert max(trainer.seen) <= eta and max(m["staleness/max"] for m in ms) <= eta
    assert trainer.acfg.loss == "ppo"  # restored after the run


def test_staleness_metrics_by_hand():
    def traj(versions):
        return Trajectory("s", "g", [0] * (1 + len(versions)), [False] + [True] * len(versions),
                          [0.0] * (1 + len(versions)), [-1] + versions)

    m = staleness_metrics([traj([3, 3]), traj([1, 2, 3]), traj([2])], version=3, eta=2)
    assert m["staleness/mean"] == pytest.approx((0 + 2 + 1) / 3) and m["staleness/max"] == 2
    assert (m["staleness/frac_0"], m["staleness/frac_1"], m["staleness/frac_2"]) == pytest.approx((1 / 3,) * 3)
    assert m["staleness/mixed_frac"] == pytest.approx(1 / 3)


def test_async_algo_config():
    base = AlgoConfig()
    assert async_algo_config(base, 0) is base
    got = async_algo_config(base, 2)
    assert (got.loss, got.tis_level, got.behav_weight_cap) == ("decoupled_ppo_inline", "none", 5.0)
    assert not needs_old_logprobs(got)  # no recompute pass with one epoch
    two = async_algo_config(dataclasses.replace(base, ppo_epochs=2), 1)
    assert two.loss == "decoupled_ppo" and needs_old_logprobs(two)
    assert async_algo_config(dataclasses.replace(base, behav_weight_cap=3.0), 1).behav_weight_cap == 3.0
    assert async_algo_config(dataclasses.replace(base, loss="gspo"), 2).loss == "gspo"


def test_inline_proximal_equals_recomputed_proximal():
    g = torch.Generator().manual_seed(0)
    N = 12
    logp0 = -torch.rand(N, generator=g) * 3
    shift = torch.tensor([-1.0, 0.5, 2.0, -0.3, 2.5, 0.0, 1.0, -2.0, 0.2, 1.8, -0.5, 0.1])
    behav = logp0 - shift  # behaviour weights w = exp(shift): 3 tokens above the cap of 5
    cfg = dataclasses.replace(AlgoConfig(), behav_weight_cap=5.0)

    def run(fn, old):
        logp = logp0.clone().requires_grad_(True)
        inp = LossInput(logp=logp, old_logp=old, advantages=torch.randn(N, generator=torch.Generator().manual_seed(1)),
                        mask=torch.ones(N), seq_ids=torch.arange(N) // 4, num_tokens=N, num_seqs=3, behav_logp=behav)
        loss, m = fn(inp, cfg)
        loss.backward()
        return float(loss.detach()), logp.grad, m

    ref = run(decoupled_ppo, logp0.clone())  # the proximal log-probs of a separate no-grad pass
    got = run(decoupled_ppo_inline, torch.zeros(N))  # old_logp is ignored
    assert got[0] == pytest.approx(ref[0], abs=1e-7) and torch.allclose(got[1], ref[1], atol=1e-7)
    assert got[2]["is/behav_masked_frac"] == ref[2]["is/behav_masked_frac"] == pytest.approx(3 / 12)
    assert float(got[1].abs().sum()) > 0
    naive = run(decoupled_ppo, behav.clone())  # proximal = behaviour would be a different objective
    assert not torch.allclose(naive[1], ref[1])


# ----------------------------------------------------------------------------- real tiny runs
class CountSeeded:
    """For the sync loop: the i-th generate call gets seed group_seed(seed, i), as group i does in run_async."""

    def __init__(self, engine, seed):
        self.engine, self.seed, self.calls = engine, seed, itertools.count()

    async def generate(self, ids, params, n=1):
        return await self.engine.generate(ids, dataclasses.replace(params, seed=group_seed(self.seed, next(self.calls))), n)

    def __getattr__(self, name):
        return getattr(self.engine, name)


class DigitTask:
    """A reward a random tiny model can earn (digits in the answer), so that training moves the weights."""

    def __init__(self, task):
        self.task = task

    def build_prompt(self, s):
        return self.task.build_prompt(s)

    def reward(self, text, s):
        return sum(c.isdigit() for c in text) / 12


def _tiny_loop(mode, steps=3, *extra):
    cfg = load_config(None, TINY + [f"rollout.mode={mode}", *extra])
    run = build_run(cfg)
    w0 = {k: v.clone() for k, v in run.model.state_dict().items()}
    trainer = TrainEngine(run.model, cfg.train, cfg.algo)
    engine = make_inference_engine(cfg, run.model, run.tokenizer)
    workflow = make_workflow(cfg, run)
    workflow.task = DigitTask(workflow.task)
    return cfg, run, w0, trainer, engine, workflow


def test_eta0_reproduces_the_sync_loop():
    results = {}
    for mode in ("sync", "async"):
        cfg, run, w0, trainer, engine, workflow = _tiny_loop(mode)
        ms = []
        if mode == "sync":
            run_sync(cfg, CountSeeded(engine, cfg.run.seed), workflow, trainer, run.train_samples, 0, 3,
                     lambda s, m: ms.append(m))
        else:
            run_async(cfg, engine, workflow, trainer, run.train_samples, 0, 3, lambda s, m: ms.append(m),
                      options=AsyncOptions(placement="inline"))
        engine.close()
        results[mode] = ms, run.model.state_dict()
    (ms_s, w_s), (ms_a, w_a) = results["sync"], results["async"]
    for key in ("reward/mean", "len/response_mean", "loss/policy", "perf/train_tokens"):
        assert [m[key] for m in ms_s] == pytest.approx([m[key] for m in ms_a], abs=1e-6), key
    assert max((w_s[k] - w0[k]).abs().max().item() for k in w0) > 1e-3  # training did move the weights
    assert max((w_s[k] - w_a[k]).abs().max().item() for k in w0) < 1e-5


def test_async_run_with_the_engine_in_its_own_process():
    cfg, run, w0, trainer, engine, workflow = _tiny_loop("async", 4, "rollout.max_staleness=1")
    ms = []
    last = run_rl(cfg, engine, workflow, trainer, run.train_samples, 0, 4, lambda s, m: ms.append(m))
    assert last == 4 and trainer.version == 4
    assert all(m["staleness/max"] <= 1 for m in ms) and "is/behav_weight_max" in ms[-1]  # decoupled PPO
    assert max(m["staleness/mean"] for m in ms) > 0  # generation did run ahead of training
    assert engine.version == 4  # the local engine (used for evaluation) got the final weights
    p = run.tokenizer.encode("1+2=")
    g = engine.generate_batch([p], dataclasses.replace(workflow.params, max_new_tokens=4, seed=0))[0][0]
    assert g.versions == [4] * len(g.tokens)
    engine.close()


def test_bad_options_are_clear_errors():
    cfg, run, _, trainer, engine, workflow = _tiny_loop("async", 1)
    try:
        with pytest.raises(ValueError, match="rollout.placement: unknown value 'cloud'"):
            run_async(cfg, engine, workflow, trainer, run.train_samples, 0, 1, options=AsyncOptions(placement="cloud"))
        with pytest.raises(ValueError, match="rollout.weight_sync=memory: needs rollout.placement=inline"):
            run_async(cfg, engine, workflow, trainer, run.train_samples, 0, 1,
                      options=AsyncOptions(placement="process", weight_sync="memory"))
        cfg.cluster = type("C", (), {"backend": "slurm"})()
        with pytest.raises(ValueError, match="cluster.backend: unknown value 'slurm'"):
            run_rl(cfg, engine, workflow, trainer, run.train_samples, 0, 1)
    finally:
        engine.close()


def test_bench_async_smoke(tmp_path):
    from thinkrl.bench.async_ import bench_async

    cfg = load_config(None, TINY)
    run = build_run(cfg)
    run.model.save_pretrained(tmp_path / "m")
    run.tokenizer.save_pretrained(tmp_path / "m")
    res = bench_async(["--model", str(tmp_path / "m"), "--steps", "2", "--eval-problems", "8", "--sync-threads", "1",
                       "data.num_train=100", "rollout.batch_prompts=2", "rollout.n=2", "rollout.max_new_tokens=8"])
    assert res["sync"]["trained_samples"] == res["async"]["trained_samples"] == 8
    assert res["ratio"] == pytest.approx(res["async"]["tokens_per_s"] / res["sync"]["tokens_per_s"])
    assert res["async"]["staleness_max"] <= 2 and 0 <= res["async"]["accuracy"] <= 1
    assert res["projection"]["phase_ratio_vs_sync1"] > 0 and res["projection"]["sim_ratio_vs_colocated"] > 0
