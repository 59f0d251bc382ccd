"""configs/algo/*.yaml presets: only existing keys, valid values, registered names."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import thinkrl.config as C
from thinkrl.algo import (registered_advantages, registered_kl, registered_loss_aggs, registered_losses,
                          registered_rollout_corrections)
from thinkrl.algo.config import AlgoConfig
from thinkrl.algo.shaping import shape_rewards

PRESETS = sorted((Path(__file__).resolve().parents[2] / "configs" / "algo").glob("*.yaml"))
EXPECTED = {"grpo", "dr_grpo", "dapo", "rloo", "reinforce_pp", "ppo_gae", "areal_boba", "light_r1", "cispo", "mis_tis"}


def load(path: Path) -> C.Config:
    data = yaml.safe_load(path.read_text())
    assert set(data) <= {"algo", "rollout"} and set(data.get("rollout", {})) <= {"max_staleness"}, \
        f"{path.name}: an algo section (and at most rollout.max_staleness)"
    cfg = C.Config()
    C._apply(cfg, data, "", C._all_keys(C.Config))
    return cfg


def test_all_presets_exist():
    assert EXPECTED <= {p.stem for p in PRESETS}


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_valid(path):
    a = load(path).algo
    a.validate()
    assert a.advantage in registered_advantages() and a.loss in registered_losses()
    assert a.loss_agg in registered_loss_aggs() and a.kl_estimator in registered_kl()
    assert a.rollout_correction in registered_rollout_corrections()


def test_preset_specifics():
    boba = load(Path(PRESETS[0]).with_name("areal_boba.yaml")).algo
    assert shape_rewards([0.0, 1.0], boba).tolist() == [-5.0, 5.0]
    assert (boba.advantage, boba.loss, boba.kl_coef, boba.gamma, boba.lam) == ("ppo_critic_free", "decoupled_ppo", 0.0, 1.0, 1.0)
    dr = load(Path(PRESETS[0]).with_name("dr_grpo.yaml")).algo
    assert (dr.advantage, dr.loss_agg) == ("dr_grpo", "seq-mean-token-sum-norm")
    lr1 = load(Path(PRESETS[0]).with_name("light_r1.yaml")).algo
    assert lr1.dual_clip > 1 and lr1.entropy_coef == 0 and lr1.length_reward == "cosine"
    cispo = load(Path(PRESETS[0]).with_name("cispo.yaml")).algo
    assert (cispo.loss, cispo.loss_agg, 1.0 - cispo.clip_low) == ("cispo", "token-mean", 0.0)  # no lower bound
    assert 1.0 + cispo.clip_high == 5.0  # the weight's cap: TRL's epsilon_high for cispo, slime's 1 + 4
    mt = load(Path(PRESETS[0]).with_name("mis_tis.yaml")).algo
    assert (mt.rollout_correction, mt.mis_stat, mt.tis_cap) == ("mis+tis_token", "geometric", 2.0)
    assert (mt.mis_low, mt.mis_high) == (0.999, 1.001)  # verl's decoupled_geo_rs_token_tis


@pytest.mark.parametrize("field,value", [("rollout_correction", "seq"), ("mis_stat", "mean"), ("behav_weight_cap", 0.5), ("length_reward", "x"),
                                         ("cosine_correct", [1.0]), ("overlong_buffer", -1.0), ("gamma", 1.5),
                                         ("dynamic_max_rounds", 0), ("reward_scale", 0.0)])
def test_validate_names_the_key(field, value):
    with pytest.raises(C.ConfigError, match=f"algo.{field}"):
        AlgoConfig(**{field: value}).validate()


def test_decoupled_with_a_rollout_correction_rejected():
    with pytest.raises(C.ConfigError, match="algo.rollout_correction"):
        AlgoConfig(loss="decoupled_ppo", rollout_correction="tis_token").validate()
