"""`thinkrl sft --resume`: a run killed mid-way (kill -9 inside a checkpoint write) and resumed gives the
uninterrupted run's per-step losses and final weights, bit for bit; a changed config stops the resume."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from thinkrl.cli import main
from thinkrl.train.sft import BatchOrder

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
        "model.intermediate_size=64", "data.num_train=200", "data.num_eval=16", "log.progress=false",
        "run.threads=1", "train.sft_steps=8", "train.sft_batch_size=16", "train.sft_lr=0.01",
        "train.lr_schedule=cosine", "train.sft_warmup_steps=2"]  # 200 / 16: the resumed epoch is a later one


def _sft(out, *extra):
    return ["sft", f"run.output_dir={out}", *TINY, *extra]


def _losses(out):
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in recs], [(r["loss/sft"], r["grad/norm"], r["lr"]) for r in recs]


def _final_weights(out):
    return load_file(str(out / "checkpoints" / "step_000008" / "model.safetensors"))


def test_batch_order_is_a_function_of_seed_and_step():
    a, b = BatchOrder(10, 4, seed=1), BatchOrder(10, 4, seed=1)
    seq = [a.batch(s) for s in range(12)]
    assert [b.batch(s) for s in [7, 3, 11, 0]] == [seq[7], seq[3], seq[11], seq[0]]  # any order of access
    stream = sum(seq, [])  # successive epochs are permutations of the examples
    assert all(sorted(stream[i:i + 10]) == list(range(10)) for i in range(0, 40, 10))
    assert seq != [BatchOrder(10, 4, seed=2).batch(s) for s in range(12)]


def test_sft_killed_and_resumed_equals_the_uninterrupted_run(tmp_path, capsys):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(_sft(straight)) == 0
    # checkpoints at steps 3 and 6; kill -9 while writing the one of step 6 (steps 4-6 are already logged)
    env = {**os.environ, "THINKRL_FAULT": "kill_in_save:6", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "thinkrl.cli", *_sft(killed, "train.save_every=3")], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == -signal.SIGKILL, p.stdout + p.stderr
    assert _losses(killed)[0] == [1, 2, 3, 4, 5, 6] and (killed / "checkpoints" / "step_000006.tmp").is_dir()
    assert main(_sft(killed, "train.save_every=3", "--resume")) == 0
    steps, resumed = _losses(killed)
    assert steps == list(range(1, 9))  # one record per step: 4-6 were truncated and re-logged
    assert resumed == _losses(straight)[1]  # loss, grad norm and lr of every step: bit-identical
    wa, wb = _final_weights(straight), _final_weights(killed)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert "saved" in capsys.readouterr().out


def test_resume_from_a_truncated_last_checkpoint_names_it_and_uses_the_previous_one(tmp_path, caplog):
    out = tmp_path / "r"
    assert main(_sft(out, "train.save_every=3")) == 0  # checkpoints 6 and 8 are kept
    final = {k: v.clone() for k, v in _final_weights(out).items()}  # (load_file maps the file we damage)
    losses = _losses(out)
    f = out / "checkpoints" / "step_000008" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with caplog.at_level("WARNING", logger="thinkrl"):
        assert main(_sft(out, "train.save_every=3", "--resume")) == 0
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "thinkrl"]
    assert "step_000008" in warning and "model.safetensors" in warning and "\n" not in warning
    assert _losses(out) == losses  # steps 7 and 8 again, from step 6
    wb = _final_weights(out)
    assert all(torch.equal(final[k], wb[k]) for k in final)


def test_resume_with_a_config_that_changes_results_is_one_line_and_keeps_the_saved_config(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(_sft(out, "train.sft_steps=2")) == 0
    saved = (out / "config.yaml").read_text()
    capsys.readouterr()
    assert main(_sft(out, "train.sft_steps=2", "train.sft_lr=0.5", "run.seed=3", "--resume")) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("thinkrl sft: error: --resume: the config differs from the run's in run.seed, train.sft_lr; "
                   "start a new run.output_dir or restore them")
    assert (out / "config.yaml").read_text() == saved
