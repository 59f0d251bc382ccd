"""Bad data and bad places: a malformed JSONL row, a missing field, bytes that are not UTF-8, a model directory
without weights, an output directory that cannot be created, a disk that fills up. Each is one line from the CLI
(exit 2, no traceback) naming file:line, the field or the path; nothing already written is lost."""
from __future__ import annotations

import errno
import json
import logging
import re
import subprocess
import uuid

import pytest
import torch

import thinkrl.system.checkpoint as ckpt_mod
from thinkrl.cli import main
from thinkrl.models.micro import build_micro_model, build_tokenizer
from thinkrl.system.checkpoint import OutputDirError, good_checkpoint, write_checkpoint
from thinkrl.logs import Logger
from thinkrl.system.rundir import RunDir
from thinkrl.tasks.base import Task
from thinkrl.tasks.isolation import Scorer
from thinkrl.types import Sample

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
        "model.intermediate_size=64", "data.num_train=64", "data.num_eval=4", "log.progress=false", "run.threads=1",
        "train.sft_batch_size=8", "train.sft_lr=0.01"]


def _error_line(capsys) -> str:
    """The CLI's one error line (progress bars and warnings aside); fails on a traceback or several errors."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-2000:]
    lines = [x for x in err.splitlines() if ": error: " in x]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


def _rows(path, lines):
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


GOOD = json.dumps({"prompt": "1+1", "answer": 2})


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "2+2", "answer": 4', r":3: not valid JSON \("),  # a malformed row
    ('{"prompt": "2+2"}', r":3: field 'answer' missing"),  # a missing field
    (b'{"prompt": "2+2\xff", "answer": 4}', r":3: not UTF-8 text"),  # bytes that are not UTF-8
    ("[" * 100_000, r":3: JSON nested too deeply"),
])
def test_a_bad_row_is_one_line_naming_file_and_line(tmp_path, capsys, line, message):
    data = _rows(tmp_path / "train.jsonl", [GOOD, GOOD, line, GOOD])
    out = tmp_path / "run"
    assert main(["sft", *TINY, f"data.train_path={data}", f"run.output_dir={out}"]) == 2
    err = _error_line(capsys)
    assert err.startswith(f"thinkrl sft: error: {data}") and re.search(message, err), err
    assert not (out / "checkpoints").exists()  # stopped before training


def _model_dir(tmp_path, weights: bool = True):
    tok = build_tokenizer()
    model = build_micro_model(tok, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
                              max_position=64, seed=0)
    d = tmp_path / "model"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    if not weights:
        for f in d.glob("*.safetensors"):
            f.unlink()
    return d


def test_a_model_directory_without_weights_is_one_line(tmp_path, capsys):
    d = _model_dir(tmp_path, weights=False)
    assert main(["sft", *TINY, f"model.path={d}", f"run.output_dir={tmp_path / 'a'}"]) == 2
    assert _error_line(capsys) == f"thinkrl sft: error: model.path='{d}': no weights there (no *.safetensors or pytorch_model*.bin in {d})"
    assert main(["sft", *TINY, f"run.init_from={d}", f"run.output_dir={tmp_path / 'b'}"]) == 2  # a checkpoint dir
    assert "no weights there" in _error_line(capsys)


def test_truncated_weights_are_one_line(tmp_path, capsys):
    d = _model_dir(tmp_path)
    [w] = d.glob("*.safetensors")
    w.write_bytes(w.read_bytes()[:100])
    assert main(["sft", *TINY, f"model.path={d}", f"run.output_dir={tmp_path / 'a'}"]) == 2
    assert _error_line(capsys).startswith(f"thinkrl sft: error: {d}: cannot ")


def test_an_output_dir_that_cannot_be_created_is_one_line(tmp_path, capsys):
    # as root, permission bits do not stop writes: a path below a regular file cannot be created by anyone
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = blocker / "run"
    assert main(["sft", *TINY, f"run.output_dir={out}"]) == 2
    assert _error_line(capsys) == f"thinkrl sft: error: {out}: cannot create this run.output_dir (Not a directory)"


def _enospc_on_call(monkeypatch, n: int):
    """torch.save inside checkpoint writes fails with ENOSPC from its n-th call on (1-based)."""
    real, calls = torch.save, [0]

    def save(*a, **k):
        calls[0] += 1
        if calls[0] >= n:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(ckpt_mod.torch, "save", save)


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _enospc_on_call(monkeypatch, 3)  # the checkpoints of steps 1 and 2 are written, step 3's is not
    assert main(["sft", *TINY, "train.sft_steps=5", "train.save_every=1", f"run.output_dir={out}"]) == 2
    err = _error_line(capsys)
    assert err.startswith(f"thinkrl sft: error: {out / 'checkpoints' / 'step_000003'}: checkpoint not written, "
                          "step_000002 is the newest one, untouched (No space left on device; "), err
    ckpt, warnings = good_checkpoint(out / "checkpoints")
    assert ckpt.name == "step_000002" and not warnings  # it verifies against its manifest
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000001", "step_000002"]  # no *.tmp
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    monkeypatch.undo()
    assert main(["sft", *TINY, "train.sft_steps=5", "train.save_every=1", f"run.output_dir={out}", "--resume"]) == 0


def test_a_failed_metrics_write_keeps_the_records_before(tmp_path, monkeypatch):
    rd = RunDir(tmp_path)
    rd.log({"step": 1, "x": 1.0})

    def full(self, record):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Logger, "log", full)
    with pytest.raises(OutputDirError, match=r"metrics.jsonl: metrics of step 2 not written \(No space left on device"):
        rd.log({"step": 2, "x": 2.0})
    monkeypatch.undo()
    assert rd.read_metrics() == [{"step": 1, "x": 1.0}]


def test_truncating_metrics_for_resume_is_all_or_nothing(tmp_path, monkeypatch):
    rd = RunDir(tmp_path)
    for s in (1, 2, 3):
        rd.log({"step": s})
    before = rd.metrics_path.read_bytes()

    def fail(*a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod.os, "replace", fail)  # the same os module rundir uses
    with pytest.raises(OutputDirError, match="cannot truncate the metrics"):
        rd.truncate_metrics(1)
    assert rd.metrics_path.read_bytes() == before and not list(tmp_path.glob("*.tmp"))
    monkeypatch.undo()
    rd.truncate_metrics(1)
    assert rd.read_metrics() == [{"step": 1}]


def _tmpfs(path, size: str) -> bool:
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", f"thinkrl-test-{uuid.uuid4().hex[:8]}",
                           str(path)], capture_output=True).returncode == 0


def test_a_really_full_disk_keeps_the_previous_checkpoint(tmp_path):
    # a real ENOSPC (a small tmpfs; needs the right to mount): safetensors and torch.save fail with their own errors
    disk = tmp_path / "disk"
    if not _tmpfs(disk, "300k"):
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        tok = build_tokenizer()
        model = build_micro_model(tok, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                                  intermediate_size=64, max_position=64, seed=0)
        root = disk / "checkpoints"
        write_checkpoint(root, 1, model, tok, {"x": 1}, keep=5)
        with pytest.raises(OutputDirError, match=r"step_0000(\d\d): checkpoint not written, step_0000\d\d is the newest") as e:
            for step in range(2, 100):  # until the disk is full
                write_checkpoint(root, step, model, tok, {"x": torch.zeros(10_000)}, keep=100)
        failed = int(re.search(r"step_(\d+): checkpoint not written", str(e.value)).group(1))
        ckpt, warnings = good_checkpoint(root)
        assert ckpt.name == f"step_{failed - 1:06d}" and not warnings and not list(root.glob("*.tmp"))
    finally:
        subprocess.run(["umount", str(disk)], check=True)


class NoAnswer(Task):
    def reward(self, response: str, sample: Sample) -> float:
        raise ValueError(f"sample {sample.id}: no gold answer (check data.answer_field)")


def test_a_reward_that_always_fails_says_why_once(caplog):
    import asyncio

    sc = Scorer("inline", None)
    with caplog.at_level(logging.WARNING, logger="thinkrl"):
        res = asyncio.run(sc(NoAnswer(), [("a", Sample("s1", "p")), ("b", Sample("s1", "p"))]))
    assert res == [(0.0, "error"), (0.0, "error")]
    warned = [r.getMessage() for r in caplog.records if "reward failed" in r.getMessage()]
    assert warned == ["reward failed (scored 0, counted in reward/errors): ValueError: sample s1: no gold answer "
                      "(check data.answer_field)"]
