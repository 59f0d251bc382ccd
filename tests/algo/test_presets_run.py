"""Every configs/algo/*.yaml preset runs the RL loop: quickstart config + preset, 2 steps on a tiny model.

The task is arithmetic with a reward a random model can earn (the parity of the response's character
codes), so groups are mixed and every estimator produces non-zero advantages: the weights must move.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from thinkrl.config import load_config
from thinkrl.system.setup import build_run
from thinkrl.system.train import train_rl
from thinkrl.tasks import TASKS, register_task
from thinkrl.tasks.arithmetic import Arithmetic

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "thinkrl" / "configs" / "quickstart.yaml"
PRESETS = sorted((ROOT / "configs" / "algo").glob("*.yaml"))
TASK = "parity_arithmetic_test"

if TASK not in TASKS:
    @register_task(TASK)
    class ParityArithmetic(Arithmetic):
        """Arithmetic prompts; reward 1 when the sum of the response's character codes is odd."""

        def reward(self, response, sample) -> float:
            return float(sum(map(ord, response)) % 2)

TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
        "model.intermediate_size=64", "rollout.batch_prompts=4", "rollout.n=4", "rollout.max_new_tokens=12", "rollout.engine=hf", "rollout.max_staleness=0",
        "data.num_train=50", "data.num_eval=8", "eval.k=0", "log.progress=false", "run.threads=1",
        "train.steps=2", f"task.name={TASK}"]


def test_every_preset_is_listed():
    assert len(PRESETS) >= 10 and QUICKSTART.exists()


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_runs_rl_loop(preset, tmp_path):
    cfg = load_config([QUICKSTART, preset], TINY + [f"run.output_dir={tmp_path}"])
    algo = yaml.safe_load(preset.read_text())["algo"]
    assert {k: getattr(cfg.algo, k) for k in algo} == algo  # the preset won over the quickstart
    run = build_run(cfg)
    before = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    res = train_rl(cfg, run=run)
    assert res["steps"] == 2
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]
    for r in recs:
        bad = {k: v for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)}
        assert not bad, bad
        assert {"loss/policy", "grad/norm", "reward/mean"} <= set(r)
        # the engine's and the trainer's log-probs agree to float32 rounding on the same weights
        assert r["mismatch/logp_abs_diff_max"] < 1e-3 and r["mismatch/ratio_out_frac"] == 0.0
        if "mis" in cfg.algo.rollout_correction:
            assert r["is/mis_masked_frac"] == 0.0 and "is/tis_max" in r
        assert 0.0 < r["reward/mean"] < 1.0  # mixed rewards: the advantages are not all zero
    if cfg.algo.advantage == "gae":
        assert all("loss/value" in r and "value/mean" in r for r in recs)
    assert max(r["grad/norm"] for r in recs) > 0
    changed = [k for k, v in run.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, f"{preset.stem}: no weight changed in 2 steps"
