"""`thinkrl bench rl-step`: a tiny end-to-end run of both sides, argument checks, and the missing-TRL error."""
from __future__ import annotations

import math
import sys

import pytest

from thinkrl.bench.rl_step import TRL_HINT, bench_rl_step, format_table

TINY = ["--steps", "1", "--warmup", "1", "--prompts", "2", "--n", "2", "--max-new-tokens", "6", "--sft-steps", "1",
        "--num-train", "64", "--threads", "1", "--json"]


def test_rl_step_smoke(capsys):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    res = bench_rl_step(TINY)
    for side in ("thinkrl", "trl"):
        assert res[f"{side}_s_per_step"] > 0 and res[f"{side}_cpu_s_per_step"] > 0
        assert len(res[f"{side}_step_seconds"]) == 2 and len(res[f"{side}_rewards"]) == 2  # warm-up + timed
        assert res[f"{side}_s_per_step"] == res[f"{side}_step_seconds"][1]  # the warm-up step is not timed
        assert 0.0 <= res[f"{side}_reward_mean"] <= 1.0
        assert res[f"{side}_reward_last"] == res[f"{side}_rewards"][-1]
        assert 1.0 <= res[f"{side}_completion_len"] <= 6.0  # at most --max-new-tokens, EOS counted
        assert res[f"{side}_threads"] == 1
    assert math.isclose(res["ratio"], res["trl_s_per_step"] / res["thinkrl_s_per_step"])
    assert math.isclose(res["cpu_ratio"], res["trl_cpu_s_per_step"] / res["thinkrl_cpu_s_per_step"])
    assert res["settings"]["prompts"] == 2 and res["settings"]["n"] == 2 and res["settings"]["max_new_tokens"] == 6
    assert set(res["versions"]) == {"torch", "transformers", "trl"}
    out = capsys.readouterr().out
    assert "ratio TRL / thinkrl" in out and "thinkrl step 1" in out and "trl step 1" in out


def test_table_layout():
    side = {"s_per_step": 2.0, "cpu_s_per_step": 3.0, "reward_mean": 0.25, "reward_last": 0.5, "completion_len": 30.0}
    res = {f"{k}_{f}": v * (4 if k == "trl" and f == "s_per_step" else 1) for k in ("thinkrl", "trl") for f, v in side.items()}
    res.update(ratio=4.0, cpu_ratio=1.0)
    table = format_table(res)
    assert "thinkrl      2.00       3.00       0.250       0.500           30.0" in table
    assert "trl          8.00" in table and "4.00x wall, 1.00x CPU time" in table


@pytest.mark.parametrize("argv, key", [(["--n", "1"], "--n"), (["--steps", "0"], "--steps"),
                                       (["--model", "/nonexistent"], "--model")])
def test_bad_arguments(argv, key):
    with pytest.raises(ValueError, match=key):
        bench_rl_step(argv)


def test_missing_trl_has_install_hint(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "trl", None)  # import trl -> ImportError
    with pytest.raises(ValueError, match=r"pip install 'thinkrl\[bench\]'"):
        bench_rl_step(["--steps", "1"])
    assert TRL_HINT in capsys.readouterr().out


def test_skip_trl_runs_thinkrl_alone_and_says_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "trl", None)  # TRL absent (as on a GPU image without the bench extra)
    res = bench_rl_step(TINY + ["--skip-trl", "--hidden", "32", "--layers", "1"])
    assert res["thinkrl_s_per_step"] > 0 and len(res["thinkrl_step_seconds"]) == 2
    assert "ratio" not in res and not any(k.startswith("trl_") for k in res) and "skipped" in res["trl"]
    assert res["settings"]["model"]["hidden_size"] == 32 and res["settings"]["model"]["num_layers"] == 1
    assert res["settings"]["device"] == "cpu" and res["settings"]["device_name"]
    assert "trl" not in res["versions"]
    assert "trl: skipped" in capsys.readouterr().out


def test_a_missing_device_fails_before_any_work(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        bench_rl_step(["--device", "cuda", "--skip-trl"])
