"""`thinkrl bench async`: a smoke run of both arms (sync and async) on a tiny model."""
import pytest

from thinkrl.config import load_config
from thinkrl.system.setup import build_run

TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
        "model.intermediate_size=64", "data.num_train=200", "data.num_eval=16", "rollout.n=4",
        "rollout.batch_prompts=4", "rollout.max_new_tokens=12", "eval.k=0", "log.progress=false",
        "algo.lr=0.01", "run.threads=1"]


def test_bench_async_smoke(tmp_path):
    from thinkrl.bench.async_ import bench_async

    cfg = load_config(None, TINY)
    run = build_run(cfg)
    run.model.save_pretrained(tmp_path / "m")
    run.tokenizer.save_pretrained(tmp_path / "m")
    res = bench_async(["--model", str(tmp_path / "m"), "--steps", "2", "--eval-problems", "8", "--sync-threads", "1",
                       "data.num_train=100", "rollout.batch_prompts=2", "rollout.n=2", "rollout.max_new_tokens=8"])
    assert res["sync"]["trained_samples"] == res["async"]["trained_samples"] == 8
    assert res["ratio"] == pytest.approx(res["async"]["tokens_per_s"] / res["sync"]["tokens_per_s"])
    assert res["async"]["staleness_max"] <= 2 and 0 <= res["async"]["accuracy"] <= 1
    assert res["projection"]["phase_ratio_vs_sync1"] > 0 and res["projection"]["sim_ratio_vs_colocated"] > 0
