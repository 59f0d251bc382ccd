"""thinkrl.tools.simulate: hand-computed timelines, then the properties the model must show."""
from __future__ import annotations

import dataclasses
import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thinkrl.tools.simulate import PRESETS, SimConfig, main, simulate

# A tiny machine for hand-computed timelines: decode step = 1 + 0.5 * running seconds.
TINY = dict(n_infer=1, n_train=1, decode_a=1.0, decode_b=0.5, prompt_len=0, prefill_per_token=0.0,
            train_per_token=0.0, sync_s=0.0)
# A scaled-down, generation-bound GPU-like setting with heavy-tailed lengths.
HEAVY = SimConfig(steps=12, batch_size=64, n_infer=2, n_train=2, len_median=400.0, len_sigma=1.0, max_len=4000,
                  prompt_len=50, decode_a=0.01, decode_b=1e-4, max_concurrency=64, prefill_per_token=4e-5,
                  train_per_token=1.5e-4, sync_s=1.0, recompute_kv=False)


def run(base: SimConfig | None = None, **kw):
    return simulate(dataclasses.replace(base or SimConfig(), **kw))


def test_sync_step_is_prefill_decode_train_sync():
    # 4 sequences of 10 tokens on one device: prefill 4 * 2 tok * 0.25 s = 2 s, then 10 steps of 1 + 0.5 * 4 s;
    # train 48 tokens * 0.01 s / 2 devices; weights pushed between steps (not after the last one).
    cfg = dict(TINY, mode="sync", steps=3, batch_size=4, max_concurrency=4, lengths=[10], prompt_len=2,
               prefill_per_token=0.25, train_per_token=0.01, n_train=2, sync_s=1.0)
    r = run(**cfg)
    assert r.total_s == pytest.approx(3 * (2 + 30 + 0.24) + 2 * 1.0)
    assert r.samples_per_s == pytest.approx(12 / r.total_s)
    assert r.tokens_per_s == pytest.approx(3 * 48 / r.total_s)
    assert r.train_util == pytest.approx(3 * 0.24 / r.total_s)
    assert r.infer_busy == pytest.approx(3 * 32 / r.total_s)
    assert r.infer_util == pytest.approx(3 * 40 / (r.total_s * 4 / 3))  # peak: 4 tokens per 3 s
    assert (r.staleness_mean, r.staleness_max, r.tail_idle_s) == (0.0, 0, 0.0)


def test_sync_waits_for_the_longest_sequence():
    # lengths 10 and 2 together: 2 steps of 2 s, then 8 steps of 1.5 s alone -> 16 s; the short one's slot
    # idles 12 s, over 2 slots -> 6 s; 12 tokens decoded against a peak of 1 token/s.
    r = run(**TINY, mode="sync", steps=1, batch_size=2, max_concurrency=2, lengths=[10, 2])
    assert r.total_s == pytest.approx(16.0)
    assert r.tail_idle_s == pytest.approx(6.0)
    assert r.tail_idle_frac == pytest.approx(6.0 / 16.0)
    assert r.infer_util == pytest.approx(12 / 16)


def test_queueing_and_colocated_pool():
    # 4 x 10 tokens, 2 slots per device: sync on one device runs two rounds of 10 * 2 s; colocated uses the
    # 2-device pool for generation (one round) and for training (train cost halved).
    cfg = dict(TINY, steps=1, batch_size=4, max_concurrency=2, lengths=[10], train_per_token=0.01)
    assert run(**cfg, mode="sync").total_s == pytest.approx(40 + 0.4)
    assert run(**cfg, mode="colocated").total_s == pytest.approx(20 + 0.2)


@pytest.mark.parametrize("mode,total", [("async_partial", 10.0), ("async", 15.0)])
def test_async_pipeline_by_hand(mode, total):
    # Constant 1 s decode steps, free training, 4 steps of 2 samples of 5 tokens; sync: 4 rounds of 5 s.
    # eta=1: 4 samples start at t=0 and finish at t=5, where batches 0 and 1 train at once. Partial rollout
    # admits batches 2 and 3 at once too (done at t=10). Plain async admits batch 2 after the v1 update;
    # the v2 update must then wait for batch 2 to drain (t=10) before batch 3 may start (done at t=15).
    # Staleness either way: batch v0 <- v0 (0), v1 <- v0 (1), v2 <- v1 (1), v3 <- v2 (1).
    cfg = dict(TINY, decode_b=0.0, steps=4, batch_size=2, max_concurrency=8, lengths=[5])
    assert run(**cfg, mode="sync").total_s == pytest.approx(20.0)
    assert run(**cfg, mode=mode, max_staleness=0).total_s == pytest.approx(20.0)
    r = run(**cfg, mode=mode, max_staleness=1)
    assert r.total_s == pytest.approx(total)
    assert (r.staleness_mean, r.staleness_max) == (pytest.approx(0.75), 1)


def test_partial_rollout_does_not_wait_for_in_flight_sequences():
    # lengths 2, 10, 1 (cycled), one sample per step, 1 s per trained token, eta = 2. Sample 0 trains 2..4.
    # At t=4 sample 1 (10 tokens) is still running: plain async drains it (t=10) before the update and then
    # trains sample 2 (1 s); partial rollout swaps at once and trains sample 2 (finished at t=3) at t=4.
    cfg = dict(TINY, decode_b=0.0, steps=2, batch_size=1, max_concurrency=2, lengths=[2, 10, 1],
               train_per_token=1.0, max_staleness=2)
    assert run(**cfg, mode="async").total_s == pytest.approx(11.0)
    r = run(**cfg, mode="async_partial")
    assert r.total_s == pytest.approx(5.0)
    assert (r.staleness_mean, r.staleness_max) == (0.5, 1)


def test_kv_recompute_after_a_swap_delays_in_flight_sequences():
    # eta = 1: sample 1 (started at v0) is due at v1, so the trainer waits for it. With recompute, the swap at
    # t=4 recomputes its 4 generated tokens (0.5 s each), so it ends at 12 instead of 10; then 10 s of training.
    cfg = dict(TINY, decode_b=0.0, steps=2, batch_size=1, max_concurrency=2, lengths=[2, 10, 1],
               train_per_token=1.0, max_staleness=1, prefill_per_token=0.5, mode="async_partial")
    assert run(**cfg, recompute_kv=False).total_s == pytest.approx(20.0)
    assert run(**cfg, recompute_kv=True).total_s == pytest.approx(22.0)
    assert run(**cfg, recompute_kv=True).staleness_max == 1


def test_eta_zero_async_equals_sync():
    sync = run(HEAVY, mode="sync")
    for mode in ("async", "async_partial"):
        r = run(HEAVY, mode=mode, max_staleness=0)
        assert r.total_s == pytest.approx(sync.total_s, rel=1e-6)
        assert r.staleness_max == 0


def test_long_tail_idling_makes_sync_slow():
    heavy_sync, heavy_async = run(HEAVY, mode="sync"), run(HEAVY, mode="async_partial", max_staleness=2)
    assert heavy_sync.tail_idle_frac > 0.3
    assert heavy_async.infer_util > 2 * heavy_sync.infer_util
    assert heavy_async.samples_per_s > 2 * heavy_sync.samples_per_s
    flat = dataclasses.replace(HEAVY, lengths=[400])  # same mean work, no tail
    flat_sync, flat_async = run(flat, mode="sync"), run(flat, mode="async_partial", max_staleness=2)
    assert flat_sync.tail_idle_s == 0.0
    assert flat_async.infer_util / flat_sync.infer_util < 0.8 * heavy_async.infer_util / heavy_sync.infer_util
    assert flat_async.samples_per_s / flat_sync.samples_per_s < heavy_async.samples_per_s / heavy_sync.samples_per_s


@pytest.mark.parametrize("seed", [0, 1])
def test_partial_throughput_monotone_in_eta(seed):
    sps = [run(HEAVY, mode="async_partial", max_staleness=e, seed=seed).samples_per_s for e in (0, 1, 2, 4, 8)]
    for lo, hi in zip(sps, sps[1:]):
        assert hi >= 0.98 * lo, sps
    assert sps[-1] > 3 * sps[0]


def test_partial_beats_draining_async_on_long_tails():
    assert run(HEAVY, mode="async_partial", max_staleness=4).samples_per_s > \
        1.5 * run(HEAVY, mode="async", max_staleness=4).samples_per_s


@settings(max_examples=100, deadline=None)
@given(mode=st.sampled_from(["async", "async_partial"]), eta=st.integers(0, 4), steps=st.integers(1, 6),
       batch=st.integers(1, 6), conc=st.integers(1, 8), n_infer=st.integers(1, 3), seed=st.integers(0, 99),
       sigma=st.floats(0.0, 2.0), train=st.floats(0.0, 0.05), recompute=st.booleans())
def test_staleness_never_exceeds_eta(mode, eta, steps, batch, conc, n_infer, seed, sigma, train, recompute):
    r = simulate(SimConfig(mode=mode, max_staleness=eta, steps=steps, batch_size=batch, max_concurrency=conc,
                           n_infer=n_infer, seed=seed, len_sigma=sigma, len_median=20.0, max_len=300,
                           train_per_token=train, recompute_kv=recompute))
    assert 0 <= r.staleness_mean <= r.staleness_max <= eta
    assert r.total_s > 0 and 0 <= r.infer_util <= 1 + 1e-9 and 0 <= r.train_util <= 1 + 1e-9


def test_deterministic_for_a_seed_and_fast():
    t0 = time.perf_counter()
    a = simulate(SimConfig())
    assert time.perf_counter() - t0 < 5.0  # generous: a loaded CI machine is slow
    assert simulate(SimConfig()) == a
    assert simulate(SimConfig(seed=1)).total_s != a.total_s
    assert simulate(dataclasses.replace(PRESETS["gpu"], steps=2)).total_s > 0


@pytest.mark.parametrize("field,value", [("mode", "pipelined"), ("batch_size", 0), ("max_staleness", -1),
                                         ("lengths", []), ("lengths", [3, 0]), ("decode_a", 0.0),
                                         ("len_sigma", -0.1), ("steps", 2.5)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}: "):
        simulate(dataclasses.replace(SimConfig(), **{field: value}))


def test_cli_table_and_json(capsys):
    assert main(["--steps", "3", "--etas", "0,2", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[1].split()[:3] == ["mode", "eta", "time_s"]
    data = json.loads(out[-1])
    assert [(r["mode"], r["max_staleness"]) for r in data["results"]] == [
        ("sync", 0), ("colocated", 0), ("async", 0), ("async", 2), ("async_partial", 0), ("async_partial", 2)]
    assert data["config"]["steps"] == 3 and data["preset"] == "cpu" and data["config"]["recompute_kv"] is False
    assert data["results"][2]["total_s"] == pytest.approx(data["results"][0]["total_s"])  # eta 0 == sync


def test_cli_knobs_reach_the_config(capsys):
    argv = ["--preset", "gpu", "--steps", "2", "--batch-size", "8", "--lengths", "100,900", "--decode-b", "0.001",
            "--recompute-kv", "--etas", "1", "--json"]
    assert main(argv) == 0
    conf = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["config"]
    assert (conf["steps"], conf["batch_size"], conf["lengths"], conf["decode_b"]) == (2, 8, [100, 900], 0.001)
    assert conf["recompute_kv"] is True and conf["n_infer"] == PRESETS["gpu"].n_infer


def test_cli_bad_value_is_one_line_error(capsys):
    assert main(["--batch-size", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "batch_size" in err and len(err.splitlines()) == 1
