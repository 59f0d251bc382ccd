"""Logging sinks: a short training run with tensorboard and wandb (offline) writes the metrics.jsonl names to both,
read back with TensorBoard's EventAccumulator and W&B's own record format; a resumed run continues the same logs."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from thinkrl.config import ConfigError, load_config
from thinkrl.logs import Logger, scalars
from thinkrl.system.train import train_rl

pytestmark = pytest.mark.usefixtures("one_thread")

QUICKSTART = Path(__file__).resolve().parents[1] / "thinkrl" / "configs" / "quickstart.yaml"
SMALL = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
         "model.intermediate_size=64", "data.num_train=64", "data.num_eval=4", "rollout.n=2",
         "rollout.batch_prompts=2", "rollout.max_new_tokens=8", "eval.k=0", "log.progress=false", "run.threads=1",
         "log.backends=[jsonl, tensorboard, wandb]", "train.save_every=2"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")


def tensorboard_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def wandb_history(run_file: Path) -> list[dict]:
    """The history records of an offline .wandb file: W&B's LevelDB-style log (a 7-byte header, 32 KiB blocks of
    records with a 7-byte header: crc32, length, type FULL/FIRST/MIDDLE/LAST), each a wandb_internal Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = run_file.read_bytes(), 32768
    assert data[:4] == b":W&B"
    records, pos, part = [], 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 2):
            part = chunk
        elif kind in (3, 4):
            part += chunk
        if kind in (1, 4):
            records.append(part)
        if kind == 0 and n == 0:
            pos += block - pos % block
    out = []
    for raw in records:
        r = pb.Record()
        r.ParseFromString(raw)
        if r.WhichOneof("record_type") == "history":
            out.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item})
    return out


def test_a_training_run_writes_the_same_metrics_to_tensorboard_and_wandb(tmp_path):
    out = tmp_path / "run"
    cfg = load_config(QUICKSTART, SMALL + [f"run.output_dir={out}", "train.steps=3"])
    train_rl(cfg)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]

    tb = tensorboard_scalars(out / "tensorboard")
    names = set().union(*(scalars(r) for r in recs))
    assert {"reward/mean", "acc/mean", "loss/policy", "group/all_correct_frac"} <= names
    assert set(tb) == names  # every scalar under its metrics.jsonl name, nothing else
    for name in names:
        want = [(r["step"], r[name]) for r in recs if name in scalars(r)]
        assert [s for s, _ in tb[name]] == [s for s, _ in want]
        assert [v for _, v in tb[name]] == pytest.approx([v for _, v in want], rel=1e-6, nan_ok=True)

    [run_file] = (out / "wandb").glob("offline-run-*/run-*.wandb")
    run_id = (out / "wandb_id").read_text().strip()
    assert run_file.name == f"run-{run_id}.wandb"
    hist = wandb_history(run_file)
    assert [h["_step"] for h in hist] == [1, 2, 3]
    for h, r in zip(hist, recs):
        assert {k: v for k, v in h.items() if not k.startswith("_")} == pytest.approx(scalars(r))

    # as if killed after logging step 3 and before its checkpoint: resumed from step 2 to step 4, TensorBoard
    # purges the first start's step 3 and shows each step once; W&B continues the same run id (a second
    # offline directory of it) from step 3
    import shutil

    shutil.rmtree(out / "checkpoints" / "step_000003")
    train_rl(load_config(QUICKSTART, SMALL + [f"run.output_dir={out}", "train.steps=4"]), resume=True)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    tb = tensorboard_scalars(out / "tensorboard")
    for name in ("reward/mean", "time"):  # time: the resumed start's step 3, not the first one's
        assert [s for s, _ in tb[name]] == [1, 2, 3, 4]
        assert [v for _, v in tb[name]] == pytest.approx([r[name] for r in recs], rel=1e-6)
    runs = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 2 and {p.name for p in runs} == {f"run-{run_id}.wandb"}
    second = next(p for p in runs if p != run_file)
    assert [h["_step"] for h in wandb_history(second)] == [3, 4]


def test_sft_logs_its_loss_to_tensorboard_without_the_phase_string(tmp_path):
    from thinkrl.system.train import train_sft

    out = tmp_path / "sft"
    train_sft(load_config(QUICKSTART, SMALL + [f"run.output_dir={out}", "train.sft_steps=3", "train.sft_batch_size=4",
                                               "log.backends=[tensorboard]"]))
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["phase"]) for r in recs] == [(1, "sft"), (2, "sft"), (3, "sft")]
    tb = tensorboard_scalars(out / "tensorboard")
    assert "phase" not in tb and [s for s, _ in tb["loss/sft"]] == [1, 2, 3]
    assert [v for _, v in tb["loss/sft"]] == pytest.approx([r["loss/sft"] for r in recs], rel=1e-6)
    assert not (out / "wandb").exists()


def test_scalar_sinks_skip_what_is_not_a_number(tmp_path):
    assert scalars({"step": 3, "phase": "sft", "ok": True, "x": 2, "y": 0.5, "z": [1]}) == {"x": 2.0, "y": 0.5}
    with Logger.open(tmp_path) as log:  # no config: metrics.jsonl alone
        log.log({"step": 1, "phase": "sft", "loss/sft": 0.5})
        with pytest.raises(ValueError, match="integer 'step'"):
            log.log({"loss/sft": 0.5})
    assert [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == \
        [{"step": 1, "phase": "sft", "loss/sft": 0.5}]
    assert not (tmp_path / "tensorboard").exists()


def test_a_backend_without_its_package_fails_at_load(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"log.backends: wandb needs the wandb package \(pip install 'thinkrl\[log\]'\)"):
        load_config(None, ["log.backends=[jsonl, wandb]"])
    load_config(None, ["log.backends=[jsonl, tensorboard]"])


def test_an_unknown_backend_fails_at_load():
    with pytest.raises(ConfigError, match="log.backends: unknown backend 'mlflow'; valid: jsonl, tensorboard, wandb"):
        load_config(None, ["log.backends=[jsonl, mlflow]"])
    with pytest.raises(ConfigError, match="log.wandb_mode: unknown value 'cloud'"):
        load_config(None, ["log.wandb_mode=cloud"])
