"""The engine contract: the registry, declared capabilities, the config's engine and pause-mode choices, and the
parts written once in the base (generate_batch, generate_many, load_weights)."""
from __future__ import annotations

import asyncio

import pytest

from thinkrl.config import ConfigError, load_config
from thinkrl.rollout import base
from thinkrl.rollout.base import (PAUSE_MODES, EngineCaps, InferenceEngine, engine_class, engine_names,
                                  register_engine)
from thinkrl.types import Generation, SamplingParams


def test_every_registered_engine_is_an_inference_engine():
    pytest.importorskip("thinkrl.system.ray_")  # registers the Ray placement too
    assert engine_names() == ["embedded", "hf", "remote"]  # placements (process, ray) are not rollout.engine values
    assert {"embedded", "hf", "remote", "process", "ray"} <= set(base.ENGINES)
    for name, cls in base.ENGINES.items():
        assert issubclass(cls, InferenceEngine) and cls.name == name
        assert isinstance(cls.caps, EngineCaps) and set(cls.caps.pause_modes) <= set(PAUSE_MODES)
        assert cls.resolve_pause_mode("auto") == cls.caps.pause_modes[0]
        assert not getattr(cls, "__abstractmethods__", None), f"{name}: abstract {cls.__abstractmethods__}"
    assert engine_class("hf").caps.shares_trainer_weights and not engine_class("embedded").caps.shares_trainer_weights


def test_register_engine_refuses_what_is_not_an_engine():
    engine_names()  # the built-in engines are registered
    with pytest.raises(TypeError, match="not an InferenceEngine subclass"):
        register_engine("duck")(type("Duck", (), {}))
    with pytest.raises(ValueError, match="already registered"):
        register_engine("embedded")(Echo)
    with pytest.raises(ValueError, match="rollout.engine: unknown value 'duck'"):
        engine_class("duck")


@pytest.mark.parametrize("overrides,msg", [
    (["rollout.engine=vllm"], "rollout.engine: unknown value 'vllm'; valid: embedded, hf, remote"),
    (["rollout.pause_mode=retract"], "rollout.pause_mode: rollout.engine=embedded supports auto, in_place, abort, "
                                     "got 'retract'"),
    (["rollout.engine=hf", "rollout.pause_mode=abort"], "rollout.engine=hf supports auto, in_place, got 'abort'"),
    (["rollout.pause_mode=wait"], "got 'wait'"),
])
def test_config_refuses_unknown_engines_and_unsupported_pause_modes_in_one_line(overrides, msg):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_config_accepts_each_engines_pause_modes():
    assert load_config(None, []).rollout.pause_mode == "auto"
    remote = ["rollout.engine=remote", "rollout.servers=[http://127.0.0.1:1]"]
    for mode in ("abort", "in_place", "retract"):
        assert load_config(None, remote + [f"rollout.pause_mode={mode}"]).rollout.pause_mode == mode
    assert engine_class("remote").resolve_pause_mode("auto") == "abort"
    assert engine_class("embedded").resolve_pause_mode("auto") == "in_place"


class Echo(InferenceEngine):
    """Echoes the prompt; records the control calls."""

    caps = EngineCaps(in_process=True, pause_modes=("in_place", "abort"), transports=("memory",))

    def __init__(self, fail_update: bool = False):
        super().__init__()
        self.calls, self.fail_update = [], fail_update

    @classmethod
    def from_config(cls, cfg, model, tokenizer, version=0):
        return cls()

    async def generate(self, input_ids, params=None, n=1):
        await asyncio.sleep(0)
        return [Generation(list(input_ids), [0.0] * len(input_ids), [self.version] * len(input_ids), "stop")] * n

    def pause(self, mode=None):
        self.calls.append(("pause", self.resolve_pause_mode(mode or self.pause_mode)))

    def update_weights(self, src, version):
        self.calls.append(("update", version))
        if self.fail_update:
            raise ValueError("bad weights")
        self.version = version

    def resume(self):
        self.calls.append(("resume",))


def test_generate_batch_blocks_with_or_without_a_running_event_loop():
    e = Echo()
    groups = e.generate_batch([[1, 2], [3]], SamplingParams(), n=2)
    assert [[g.tokens for g in gs] for gs in groups] == [[[1, 2], [1, 2]], [[3], [3]]]

    async def inside_a_loop():
        return e.generate_batch([[5]], None, 1)

    assert asyncio.run(inside_a_loop())[0][0].tokens == [5]
    assert asyncio.run(e.generate_many([([7], None, 1), ([8, 9], None, 3)]))[1][2].tokens == [8, 9]


def test_load_weights_is_pause_update_resume_and_resumes_on_failure():
    e = Echo()
    e.load_weights({}, 3)
    e.load_weights({}, 4, mode="abort")
    assert e.calls == [("pause", "in_place"), ("update", 3), ("resume",), ("pause", "abort"), ("update", 4), ("resume",)]
    assert e.version == 4
    bad = Echo(fail_update=True)
    with pytest.raises(ValueError, match="bad weights"):
        bad.load_weights({}, 1)
    assert bad.calls[-1] == ("resume",) and bad.version == 0
    with pytest.raises(ValueError, match="'retract' is not supported"):
        e.load_weights({}, 5, mode="retract")
    with pytest.raises(ValueError, match="pause_mode: unknown value 'keep'"):
        Echo.resolve_pause_mode("keep")
