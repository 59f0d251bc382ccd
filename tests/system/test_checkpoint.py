"""Checkpoints: atomic writes (kill -9 mid-write), the manifest check at resume, keep_checkpoints, RNG state,
and the config check of `--resume`."""
import json
import os
import random
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import yaml

from thinkrl.config import Config, ConfigError, load_config
from thinkrl.models.micro import build_micro_model
from thinkrl.system.checkpoint import MANIFEST, STATE_FILE, load_state, rng_state, set_rng_state, verify
from thinkrl.system.rundir import RunDir, check_resume_config

pytestmark = pytest.mark.usefixtures("one_thread")

MICRO = dict(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32)


@pytest.fixture(scope="module")
def model(tok):
    return build_micro_model(tok, **MICRO)


def _steps(rundir):
    return [int(p.name.split("_")[1]) for p in rundir.checkpoints()]


def test_checkpoint_is_a_model_dir_with_a_manifest(tmp_path, model, tok):
    rd = RunDir(tmp_path)
    ckpt = rd.save_checkpoint(3, model, tok, {"opt": {"lr": 0.1}, "buffer": [1, 2]}, keep=2)
    assert ckpt.name == "step_000003" and not list(rd.ckpt_root.glob("*.tmp"))
    man = json.loads((ckpt / MANIFEST).read_text())
    assert man["step"] == 3
    listed = {e["path"]: e for e in man["files"]}
    on_disk = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(listed) == on_disk and {"config.json", "model.safetensors", STATE_FILE} <= on_disk
    assert all(listed[f]["size"] == (ckpt / f).stat().st_size for f in listed)
    assert load_state(ckpt) == {"opt": {"lr": 0.1}, "buffer": [1, 2], "step": 3}
    assert verify(ckpt) is None
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(ckpt)  # plain transformers loads it


def test_keep_checkpoints_and_a_resumed_run_replaces_later_ones(tmp_path, model, tok):
    rd = RunDir(tmp_path)
    for s in [1, 2, 3, 4]:
        rd.save_checkpoint(s, model, tok, {}, keep=2)
    assert _steps(rd) == [3, 4]
    rd.save_checkpoint(4, model, tok, {"again": True}, keep=2)  # the same step again replaces it
    assert _steps(rd) == [3, 4] and load_state(rd.checkpoints()[-1])["again"]
    rd.save_checkpoint(2, model, tok, {}, keep=3)  # a run resumed from step 2: steps 3, 4 were another future
    assert _steps(rd) == [2]
    rd.save_checkpoint(5, model, tok, {}, keep=1)
    assert _steps(rd) == [5]
    with pytest.raises(ValueError, match="keep_checkpoints"):
        rd.save_checkpoint(6, model, tok, {}, keep=0)
    with pytest.raises(ConfigError, match="train.keep_checkpoints: must be >= 1"):
        load_config(None, ["train.keep_checkpoints=0"])


def _truncate(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return "model.safetensors"


def _flip_byte(ckpt):  # same size, other contents: only the checksum sees it
    f = ckpt / STATE_FILE
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0xFF
    f.write_bytes(bytes(b))
    return STATE_FILE


def _delete_file(ckpt):
    (ckpt / "config.json").unlink()
    return "config.json"


def _delete_manifest(ckpt):
    (ckpt / MANIFEST).unlink()
    return MANIFEST


@pytest.mark.parametrize("damage", [_truncate, _flip_byte, _delete_file, _delete_manifest])
def test_a_damaged_last_checkpoint_is_named_and_the_previous_one_used(tmp_path, model, tok, damage, caplog):
    rd = RunDir(tmp_path)
    for s in [1, 2]:
        rd.save_checkpoint(s, model, tok, {"s": s}, keep=2)
    bad_file = damage(rd.checkpoints()[-1])
    ckpt, warnings = rd.good_checkpoint()
    assert ckpt.name == "step_000001" and load_state(ckpt)["s"] == 1
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "step_000002" in warnings[0] and bad_file in warnings[0]
    with caplog.at_level("WARNING", logger="thinkrl"):
        assert rd.resume_checkpoint() == ckpt
    assert [r.getMessage() for r in caplog.records] == warnings


def test_no_good_checkpoint_is_a_one_line_error(tmp_path, model, tok):
    rd = RunDir(tmp_path)
    with pytest.raises(ValueError, match=r"^--resume: no checkpoint in .*checkpoints$"):
        rd.resume_checkpoint()
    rd.save_checkpoint(1, model, tok, {}, keep=2)
    _truncate(rd.checkpoints()[-1])
    with pytest.raises(ValueError) as e:
        rd.resume_checkpoint()
    msg = str(e.value)
    assert msg.startswith("--resume: no checkpoint in") and "step_000001" in msg and "model.safetensors" in msg
    assert "\n" not in msg


KILL_SCRIPT = textwrap.dedent("""
    import sys
    from thinkrl.models.micro import build_micro_model, build_tokenizer
    from thinkrl.system.rundir import RunDir
    tok = build_tokenizer()
    model = build_micro_model(tok, **{micro})
    rd = RunDir(sys.argv[1])
    rd.save_checkpoint(1, model, tok, {{"s": 1}}, keep=2)
    rd.save_checkpoint(2, model, tok, {{"s": 2}}, keep=2)  # THINKRL_FAULT=kill_in_save:2 kills this write
    print("not killed")
""")


def test_kill_during_a_checkpoint_write_leaves_the_previous_one_good(tmp_path, model, tok):
    env = {**os.environ, "THINKRL_FAULT": "kill_in_save:2", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", KILL_SCRIPT.format(micro=MICRO), str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stdout + p.stderr
    rd = RunDir(tmp_path)
    torn = rd.ckpt_root / "step_000002.tmp"
    assert torn.is_dir() and (torn / "model.safetensors").exists()  # killed with part of the files written
    assert _steps(rd) == [1]  # the torn write is not a checkpoint
    ckpt, warnings = rd.good_checkpoint()
    assert ckpt.name == "step_000001" and warnings == [] and load_state(ckpt)["s"] == 1
    rd.save_checkpoint(2, model, tok, {"s": 2}, keep=2)  # the next write cleans the leftover up
    assert not torn.exists() and _steps(rd) == [1, 2]


def test_rng_state_round_trip():
    state = rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


def _saved(cfg) -> dict:
    return yaml.safe_load(yaml.safe_dump(cfg.to_dict()))


def test_check_resume_config_names_the_keys_that_change_results():
    saved = _saved(load_config(None, ["algo.lr=0.01", "task.params.digits=3"]))
    same_results = load_config(None, ["algo.lr=0.01", "task.params.digits=3", "train.steps=7", "train.save_every=3",
                                      "train.keep_checkpoints=5", "log.progress=false", "eval.k=0", "eval.every=2",
                                      "run.output_dir=elsewhere", "run.threads=3"])
    check_resume_config(saved, same_results)
    changed = load_config(None, ["algo.lr=0.02", "rollout.n=3", "task.params.digits=4", "train.steps=7"])
    with pytest.raises(ConfigError) as e:
        check_resume_config(saved, changed)
    assert str(e.value) == ("--resume: the config differs from the run's in algo.lr, rollout.n, task.params.digits; "
                            "start a new run.output_dir or restore them")
    # a key the saved config lacks (a field added since) compares as its default
    del saved["train"]["sft_warmup_steps"]
    check_resume_config(saved, load_config(None, ["algo.lr=0.01", "task.params.digits=3"]))
    with pytest.raises(ConfigError, match="in train.sft_warmup_steps;"):
        check_resume_config(saved, load_config(None, ["algo.lr=0.01", "task.params.digits=3", "train.sft_warmup_steps=5"]))
    assert Config().train.sft_warmup_steps == 0
