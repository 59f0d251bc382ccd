"""thinkrl.system.loop: the one controller. With fakes: never trains a group staler than η (free-running and
fixed schedule), the fixed schedule's versions, dynamic sampling in every mode, checkpoints of the rollouts.
With a tiny model: deterministic runs repeat exactly, resume of a deterministic async run is exact, and a
run with the engine in its own process."""
from __future__ import annotations

import asyncio
import json
import random
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from thinkrl.algo.config import AlgoConfig
from thinkrl.config import load_config
from thinkrl.rollout.base import EngineCaps, InferenceEngine
from thinkrl.rollout.weights import WeightSync
from thinkrl.system.loop import run_loop
from thinkrl.system.train import train_rl
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


# ----------------------------------------------------------------------------- fakes
class FakeEngine(InferenceEngine):
    """Tokens come one at a time with random delays; each carries the version loaded when it was produced."""

    caps = EngineCaps(in_process=True, pause_modes=("in_place",), transports=("memory",), mid_sequence_update=True)

    def __init__(self, rnd: random.Random, max_delay: float, rewards=None):
        super().__init__()
        self.rnd, self.max_delay, self.loads = rnd, max_delay, []
        self.rewards = rewards

    @classmethod
    def from_config(cls, cfg, model, tokenizer, version=0):
        raise NotImplementedError

    async def generate(self, input_ids, params=None, n=1):
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
        self.loads.append(version)
        self.version = version


class FakeWorkflow:
    """Two answers per prompt; rewards per group from `rewards(index)` (default 0 and 1: informative)."""

    def __init__(self, rewards=None):
        self.rewards = rewards or (lambda j: (0.0, 1.0))

    async def run_episode(self, engine, sample, group_id=None):
        gens = await engine.generate([1, 2], None, 2)
        rs = self.rewards(int(sample.id))
        return [Trajectory(sample.id, group_id, [1, 2] + g.tokens, [False] * 2 + [True] * len(g.tokens),
                           [0.0] * 2 + g.logprobs, [-1, -1] + g.versions, reward=rs[i], prompt_len=2)
                for i, g in enumerate(gens)]


class FakeTrainer:
    def __init__(self, rnd: random.Random, max_delay: float):
        self.version, self.acfg, self.rnd, self.max_delay = 0, AlgoConfig(), rnd, max_delay
        self.seen: list[int] = []  # staleness of every trained trajectory, checked here independently
        self.batches: list[list[str]] = []

    def logprobs(self, trajs):
        return [t.logprobs for t in trajs]

    def step(self, batch, old_logprobs=None, ref_logprobs=None):
        for t in batch.trajectories:
            self.seen.append(self.version - min(v for v in t.versions if v >= 0))
        self.batches.append(sorted({t.sample_id for t in batch.trajectories}, key=int))
        time.sleep(self.rnd.random() * self.max_delay)
        self.version += 1
        return {"perf/train_tokens": float(batch.num_tokens)}

    def export_weights(self):
        return {"w": torch.tensor([float(self.version)])}


def _samples(n=400):
    return [Sample(id=str(i), prompt="p", answer=None) for i in range(n)]


def _fake_run(overrides, seed=0, gen_delay=1e-4, train_delay=0.0, steps=6, rewards=None, **kw):
    cfg = load_config(None, overrides + ["data.shuffle=false"])
    rnd = random.Random(seed)
    engine, trainer, ms = FakeEngine(rnd, gen_delay), FakeTrainer(rnd, train_delay), []
    last = run_loop(cfg, trainer, engine, WeightSync([engine]), FakeWorkflow(rewards), _samples(), 0, steps,
                    lambda s, m: ms.append(m), **kw)
    return last, engine, trainer, ms


# ----------------------------------------------------------------------------- the loop, with fakes
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 3), st.integers(1, 3), st.integers(0, 2**32 - 1), st.sampled_from([1e-4, 2e-3]),
       st.sampled_from([0.0, 5e-3]), st.booleans())
def test_loop_never_trains_beyond_eta(eta, B, seed, gen_delay, train_delay, fixed):
    over = [f"rollout.batch_prompts={B}", f"rollout.max_staleness={eta}", "algo.loss=decoupled_ppo",
            f"run.deterministic={str(fixed).lower()}"]
    last, engine, trainer, ms = _fake_run(over, seed, gen_delay, train_delay)
    assert last == 6 and len(trainer.seen) == 6 * B * 2
    assert max(trainer.seen) <= eta and max(m["staleness/max"] for m in ms) <= eta
    trained = [j for m in ms for j in m["groups"]]
    assert len(trained) == len(set(trained)) == 6 * B  # no group twice
    if fixed:  # batch j from version max(0, j - η), exactly; loads only between batches
        assert trained == list(range(6 * B))
        assert [m["staleness/max"] for m in ms] == [float(min(j, eta)) for j in range(6)]
        assert engine.loads == sorted(set(engine.loads))
    if eta == 0:  # the synchronous loop: step j trains exactly the prompts of step j
        assert trainer.batches == [[str(j) for j in range(s * B, (s + 1) * B)] for s in range(6)]


@pytest.mark.parametrize("eta, fixed", [(0, False), (2, False), (0, True)])
def test_dynamic_sampling_in_every_mode(eta, fixed):
    """Groups with index % 3 == 0 are uniform (rewards 1, 1): each batch keeps B informative ones."""
    B = 3
    over = [f"rollout.batch_prompts={B}", f"rollout.max_staleness={eta}", "algo.loss=decoupled_ppo",
            "algo.dynamic_sampling=true", "algo.dynamic_max_rounds=4", f"run.deterministic={str(fixed).lower()}"]
    last, engine, trainer, ms = _fake_run(over, rewards=lambda j: (1.0, 1.0) if j % 3 == 0 else (0.0, 1.0))
    assert last == 6
    for m, batch in zip(ms, trainer.batches):
        assert len(batch) == B and all(int(j) % 3 for j in batch)  # informative groups only
        assert m["staleness/max"] <= eta
        assert m["dynamic/rounds"] >= (2 if eta == 0 else 1)  # the first B groups include a uniform one
    trained = [j for m in ms for j in m["groups"]]
    assert len(trained) == len(set(trained))


def test_dynamic_sampling_tops_up_with_uniform_groups_when_the_rounds_run_out():
    over = ["rollout.batch_prompts=2", "algo.dynamic_sampling=true", "algo.dynamic_max_rounds=2"]
    _, _, trainer, ms = _fake_run(over, steps=2, rewards=lambda j: (1.0, 1.0))
    assert all(m["dynamic/rounds"] == 2 and m["dynamic/informative_groups"] == 0 for m in ms)
    assert all(len(b) == 2 for b in trainer.batches)


@pytest.mark.parametrize("fixed", [False, True])
def test_checkpoints_carry_the_rollouts_and_resume_trains_each_group_once(fixed):
    B, eta = 2, 2
    over = [f"rollout.batch_prompts={B}", f"rollout.max_staleness={eta}", "algo.loss=decoupled_ppo",
            "train.save_every=2", f"run.deterministic={str(fixed).lower()}"]
    saved = {}
    last, _, _, ms = _fake_run(over, steps=4, checkpoint=lambda s, st, keep_all: saved.setdefault(s, st))
    assert last == 4 and sorted(saved) == [2, 4]
    st2 = saved[2]["rollouts"]
    trained = [j for m in ms[:2] for j in m["groups"]]
    kept = [i for i, _, _ in st2["finished"]] + st2["in_flight"]
    assert sorted(trained + kept) == list(range(st2["next_index"]))  # nothing lost, nothing twice
    if fixed:  # the batches that need versions older than 2 are generated and kept (batch 4, from version 2
        # itself, may be too); none in flight
        assert st2["in_flight"] == [] and sorted(kept)[: eta * B] == list(range(2 * B, (2 + eta) * B))
        assert len(kept) in (eta * B, (eta + 1) * B)
    cfg = load_config(None, over + ["data.shuffle=false"])
    rnd = random.Random(1)
    engine, trainer, ms2 = FakeEngine(rnd, 1e-4), FakeTrainer(rnd, 0.0), []
    trainer.version = 2
    engine.version = 2
    run_loop(cfg, trainer, engine, WeightSync([engine]), FakeWorkflow(), _samples(), 2, 6,
             lambda s, m: ms2.append(m), restore=st2)
    again = trained + [j for m in ms2 for j in m["groups"]]
    assert len(again) == len(set(again)) == 6 * B and max(m["staleness/max"] for m in ms2) <= eta
    if fixed:
        assert again == list(range(6 * B))


def test_a_rollout_error_reaches_the_trainer():
    class Broken(FakeWorkflow):
        async def run_episode(self, engine, sample, group_id=None):
            raise ValueError("reward exploded")

    cfg = load_config(None, ["rollout.batch_prompts=2"])
    engine = FakeEngine(random.Random(0), 0.0)
    with pytest.raises(RuntimeError, match="rollout failed: reward exploded"):
        run_loop(cfg, FakeTrainer(random.Random(0), 0.0), engine, WeightSync([engine]), Broken(), _samples(), 0, 2)


# ----------------------------------------------------------------------------- tiny real runs
def _metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _comparable(recs):
    """Per-step metrics a deterministic run must repeat (not times, speeds or buffer occupancy)."""
    return [{k: v for k, v in r.items() if not k.startswith(("perf/", "buffer/")) and k != "time"} for r in recs]


def _same(a, b, tol=1e-6):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], abs=tol), (ra["step"], k)


@pytest.mark.parametrize("eta", [0, 2])
def test_deterministic_runs_repeat_and_resume_exactly(tmp_path, eta):
    over = TINY + ["train.steps=4", "run.deterministic=true", f"rollout.max_staleness={eta}",
                   "algo.loss=decoupled_ppo", "rollout.placement=inline"]
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    train_rl(load_config(None, over + [f"run.output_dir={a}"]))
    train_rl(load_config(None, over + [f"run.output_dir={b}"]))
    _same(_comparable(_metrics(a)), _comparable(_metrics(b)), tol=0.0)  # bit-identical
    train_rl(load_config(None, over + [f"run.output_dir={c}", "train.steps=1"]))
    train_rl(load_config(None, over + [f"run.output_dir={c}"]), resume=True)
    _same(_comparable(_metrics(a)), _comparable(_metrics(c)), tol=0.0)
    assert [r["staleness/max"] for r in _metrics(a)] == [float(min(j, eta)) for j in range(4)]


def test_lora_run_resumes_exactly(tmp_path):
    pytest.importorskip("peft")
    over = TINY + ["train.steps=3", "run.deterministic=true", "model.lora_r=4", "algo.lr=0.05"]
    a, b = tmp_path / "a", tmp_path / "b"
    train_rl(load_config(None, over + [f"run.output_dir={a}"]))
    train_rl(load_config(None, over + [f"run.output_dir={b}", "train.steps=1"]))
    state = torch.load(b / "checkpoints" / "step_000001" / "trainer_state.pt", weights_only=False)
    assert state["lora"] and all("lora_" in k for k in state["lora"])
    train_rl(load_config(None, over + [f"run.output_dir={b}"]), resume=True)
    _same(_comparable(_metrics(a)), _comparable(_metrics(b)), tol=0.0)


def test_async_run_with_the_engine_in_its_own_process(tmp_path):
    cfg = load_config(None, TINY + ["train.steps=4", "rollout.max_staleness=1", "algo.loss=decoupled_ppo",
                                    f"run.output_dir={tmp_path}"])
    res = train_rl(cfg)
    recs = _metrics(tmp_path)
    assert res["steps"] == 4 and [r["step"] for r in recs] == [1, 2, 3, 4]
    assert all(r["staleness/max"] <= 1 for r in recs) and "is/behav_weight_max" in recs[-1]  # decoupled PPO
    assert max(r["staleness/mean"] for r in recs) > 0  # generation did run ahead of training


def test_resume_names_a_truncated_last_checkpoint_and_continues_from_the_previous(tmp_path, caplog):
    over = TINY + ["run.deterministic=true", "train.save_every=1", f"run.output_dir={tmp_path / 'b'}"]
    train_rl(load_config(None, TINY + ["run.deterministic=true", "train.steps=3", f"run.output_dir={tmp_path / 'a'}"]))
    train_rl(load_config(None, over + ["train.steps=2"]))
    weights = tmp_path / "b" / "checkpoints" / "step_000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a torn write
    with caplog.at_level("WARNING"):
        train_rl(load_config(None, over + ["train.steps=3"]), resume=True)
    bad = [r.getMessage() for r in caplog.records if "step_000002" in r.getMessage()]
    assert len(bad) == 1 and "model.safetensors" in bad[0] and "\n" not in bad[0]
    _same(_comparable(_metrics(tmp_path / "a")), _comparable(_metrics(tmp_path / "b")), tol=0.0)
