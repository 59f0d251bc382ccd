"""The NaN guard: NaN/Inf in the loss or the gradients skips the optimizer step (no weight, optimizer-state or LR
schedule change; counted in train/skipped_steps); train.max_bad_steps bad steps in a row stop the run with one
line naming the step, and what the run wrote before stays (metrics, a checkpoint that resumes)."""
from __future__ import annotations

import json
import math

import pytest
import torch

import thinkrl.system.loop as loop_mod
from thinkrl.algo.config import AlgoConfig
from thinkrl.cli import main
from thinkrl.config import TrainConfig, load_config
from thinkrl.models.micro import build_micro_model
from thinkrl.system.checkpoint import good_checkpoint
from thinkrl.system.train import train_rl, train_sft
from thinkrl.train.engine import NumericalFault, TrainEngine, stop_on_bad_steps
from thinkrl.types import Batch, Trajectory

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
        "model.intermediate_size=64", "data.num_train=200", "data.num_eval=4", "rollout.n=4",
        "rollout.batch_prompts=4", "rollout.max_new_tokens=8", "eval.k=0", "log.progress=false", "algo.lr=0.01",
        "run.threads=1"]


def _engine(tok, **tcfg):
    model = build_micro_model(tok, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
                              max_position=64, seed=0)
    return TrainEngine(model, TrainConfig(lr_schedule="linear", steps=10, **tcfg), AlgoConfig(lr=0.01))


def _batch(adv: float) -> Batch:
    toks = [1, 5, 6, 7, 8, 2]
    t = Trajectory(sample_id="s", group_id="g", tokens=toks, loss_mask=[False, False, True, True, True, True],
                   logprobs=[0.0, 0.0, -1.0, -1.0, -1.0, -1.0], versions=[-1, -1, 0, 0, 0, 0], reward=1.0,
                   finish="stop", prompt_len=2)
    return Batch(trajectories=[t], advantages=[[0.0, 0.0] + [adv] * 4])


def _snapshot(eng):
    return ({k: v.clone() for k, v in eng.model.state_dict().items()},
            eng.scheduler.last_epoch, eng.optimizer.state_dict()["state"].get(0, {}).get("step"))


def _same(a, b) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nan_or_inf_rl_step_changes_nothing_and_is_counted(tok, bad):
    eng = _engine(tok)
    m = eng.step(_batch(1.0))  # a good step first: the optimizer has state
    assert m["train/skipped_steps"] == 0 and m["train/bad_steps_in_row"] == 0
    before = _snapshot(eng)
    m = eng.step(_batch(bad))
    after = _snapshot(eng)
    assert _same(before[0], after[0]) and before[1:] == after[1:]  # weights, LR schedule, Adam's step count
    assert m["train/skipped_steps"] == 1 and m["train/bad_steps_in_row"] == 1 and not math.isfinite(m["grad/norm"])
    assert all(p.grad is None for p in eng.model.parameters())  # the bad gradients are dropped
    assert eng.version == 2  # a skipped step is still a policy version (the weights of the one before)
    m = eng.step(_batch(1.0))
    assert not _same(after[0], _snapshot(eng)[0]) and eng.scheduler.last_epoch == before[1] + 1
    assert m["train/skipped_steps"] == 1 and m["train/bad_steps_in_row"] == 0  # a good step ends the run of bad ones
    state = eng.state_dict()
    fresh = _engine(tok)
    fresh.load_state_dict(state)
    assert (fresh.guard.skipped_steps, fresh.guard.bad_in_row) == (1, 0)


def test_a_nan_sft_step_is_skipped(tok):
    eng = _engine(tok)
    ex = [([1, 5, 6, 7, 2], [False, False, True, True, True])]
    eng.sft_step(ex)
    before = _snapshot(eng)
    hook = eng.model.get_output_embeddings().register_forward_hook(lambda mod, i, out: out * float("nan"))
    m = eng.sft_step(ex)
    hook.remove()
    assert _same(before[0], _snapshot(eng)[0]) and _snapshot(eng)[1:] == before[1:]
    assert m["train/skipped_steps"] == 1 and math.isnan(m["loss/sft"])


def test_stop_on_bad_steps_names_the_step():
    stop_on_bad_steps({"train/bad_steps_in_row": 2.0}, 3, 7)  # below the limit
    stop_on_bad_steps({"train/bad_steps_in_row": 9.0}, 0, 7)  # 0: never stop
    stop_on_bad_steps({}, 1, 7)  # no policy step this time (critic warm-up)
    with pytest.raises(NumericalFault, match=r"^step 7: 3 optimizer steps in a row .*train.max_bad_steps=3"):
        stop_on_bad_steps({"train/bad_steps_in_row": 3.0}, 3, 7)


def _nan_from(step_index: int, monkeypatch):
    """From the `step_index`-th batch on (0-based), every advantage is NaN."""
    real, calls = loop_mod.make_batch, [0]

    def poisoned(*a, **k):
        b = real(*a, **k)
        calls[0] += 1
        if calls[0] > step_index:
            b.advantages = [[float("nan")] * len(x) for x in b.advantages]
        return b

    monkeypatch.setattr(loop_mod, "make_batch", poisoned)


def test_a_run_stops_after_max_bad_steps_keeps_what_it_wrote_and_resumes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    over = TINY + [f"run.output_dir={out}", "train.steps=5", "train.save_every=1", "train.max_bad_steps=2"]
    _nan_from(1, monkeypatch)  # step 1 good, steps 2 and 3 bad: stop at 3
    assert main(["train", *over]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if "error" in x or "Traceback" in x]  # not progress bars
    assert len(err) == 1 and err[0].startswith("thinkrl train: error: step 3: 2 optimizer steps in a row"), err
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert [r["train/skipped_steps"] for r in recs] == [0, 1, 2]
    ckpt, warnings = good_checkpoint(out / "checkpoints")
    assert ckpt is not None and ckpt.name == "step_000002" and not warnings  # none written at the stopping step
    monkeypatch.undo()  # the fault is gone: the run continues from its checkpoint
    res = train_rl(load_config(None, over + ["train.steps=4"]), resume=True)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert res["steps"] == 4 and [r["step"] for r in recs] == [1, 2, 3, 4]
    assert recs[-1]["train/skipped_steps"] == 1 and recs[-1]["train/bad_steps_in_row"] == 0


def test_sft_stops_after_max_bad_steps(tmp_path, monkeypatch):
    cfg = load_config(None, TINY + [f"run.output_dir={tmp_path}", "train.sft_steps=6", "train.sft_batch_size=8",
                                    "train.max_bad_steps=2", "train.save_every=1"])
    real = TrainEngine.forward

    def nan_after_two(self, mb, with_entropy=False):
        lps, ents = real(self, mb, with_entropy)
        return ([lp * float("nan") for lp in lps], ents) if self.version >= 2 else (lps, ents)

    monkeypatch.setattr(TrainEngine, "forward", nan_after_two)
    with pytest.raises(NumericalFault, match="^step 4: 2 optimizer steps"):
        train_sft(cfg)
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and [r["train/skipped_steps"] for r in recs] == [0, 0, 1, 2]
