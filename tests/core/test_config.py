import pytest

from thinkrl.config import Config, ConfigError, load_config


def test_defaults_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("algo:\n  lr: 0.01\nrollout:\n  n: 4\n")
    cfg = load_config(p, ["algo.lr=1e-5", "rollout.batch_prompts=3", "task.params.max_digits=2"])
    assert cfg.algo.lr == 1e-5 and isinstance(cfg.algo.lr, float)
    assert cfg.rollout.n == 4 and cfg.rollout.batch_prompts == 3
    assert cfg.task.params == {"max_digits": 2}


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["algo.lrr=1"], "unknown config key 'algo.lrr' (did you mean 'algo.lr'?)"),
        (["rollout.nn=1"], "did you mean 'rollout.n'"),
        (["rollout.n=abc"], "rollout.n: expected an integer, got 'abc'"),
        (["rollout.n=0"], "rollout.n: must be >= 1, got 0"),
        (["algo.lr=-1"], "algo.lr: must be > 0"),
        (["train.sft_steps=-1"], "train.sft_steps: must be >= 0"),
        (["log.progress=maybe"], "log.progress: expected true/false"),
        (["algo.advantage=foo"], "algo.advantage: unknown value 'foo'; valid: "),
        (["algo.loss=bar"], "algo.loss: unknown value 'bar'; valid: "),
        (["task.name=nope"], "task.name: unknown value 'nope'; valid: "),
        (["algo"], "expected key=value"),
        (["algo=1"], "algo: is a section"),
        (["model.num_kv_heads=3"], "model.num_kv_heads: must divide model.num_heads"),
    ],
)
def test_bad_overrides_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    msg = str(e.value)
    assert needle in msg
    assert "\n" not in msg


def test_valid_names_listed():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["algo.advantage=nope"])
    for name in ["grpo", "dr_grpo", "rloo", "reinforce_pp", "gae"]:
        assert name in str(e.value)


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("algo:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        load_config(bad)
    top = tmp_path / "top.yaml"
    top.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(top)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("rollout:\n  temperature: hot\n")
    with pytest.raises(ConfigError, match="rollout.temperature: expected a number"):
        load_config(wrong)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("rollut:\n  n: 2\n")
    with pytest.raises(ConfigError, match="unknown config key 'rollut'"):
        load_config(unknown)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["algo.lr=0.002", "rollout.n=3"])
    cfg.save(tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again.to_dict() == cfg.to_dict()
    assert Config().to_dict() != cfg.to_dict()
