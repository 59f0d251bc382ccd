"""`thinkrl bench async`: the quickstart task, synchronous vs asynchronous RL, side by side in one run.

Both arms start from the same model (the quickstart micro model after an SFT warm-up on the teacher's
demonstrations, or `--model DIR`) and a fresh optimizer, train the same number of samples (`--steps` x
batch_prompts x n) on the same prompts, and are evaluated on the same held-out problems (greedy pass@1).
- sync:  thinkrl.system.loop.run_loop with η = 0: generate a batch, train, update; `--sync-threads` torch threads
         phases (default 2: the machine's cores).
- async: thinkrl.system.loop.run_loop with η = `--eta`: the embedded engine in its own process
         (`--engine-threads`, default 1) and the trainer in this one (`--trainer-threads`, default 1), so
         generation and training overlap; weights pushed through shared memory after every step (partial
         rollout); decoupled PPO. The engine process is started (and timed) before the clock starts.
A third arm, sync with 1 thread, runs too (`--no-sync1` skips it): on a loaded machine 2 threads can be much
slower than 1, and `ratio_vs_best_sync` compares async with the faster sync arm.
Reported: trained tokens/s of each arm (prompt + response tokens trained, over the wall time of the RL loop)
and `ratio` = async / sync, final accuracies, per-phase times, CPU seconds per wall second of each process
(how much of the machine each arm got), the load average before and after each arm, and a projection:
the simulator (thinkrl.tools.simulate) run with this run's measured lengths and per-token training cost.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from thinkrl.bench import register_bench

QUICKSTART = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="thinkrl bench async")
    p.add_argument("--steps", type=int, default=40, help="RL steps per arm (same trained samples in each)")
    p.add_argument("--eta", type=int, default=2, help="staleness bound of the async arm")
    p.add_argument("--model", default="", help="start from this HF model directory (skips the SFT warm-up)")
    p.add_argument("--save-model", default="", help="keep the SFT warm-up model here (reuse it with --model)")
    p.add_argument("--sft-steps", type=int, default=300, help="SFT warm-up steps when no --model is given")
    p.add_argument("--sync-threads", type=int, default=2, help="torch threads of the sync arm")
    p.add_argument("--engine-threads", type=int, default=1, help="torch threads of the async engine process")
    p.add_argument("--trainer-threads", type=int, default=1, help="torch threads of the async trainer")
    p.add_argument("--no-sync1", action="store_true", help="skip the sync arm with 1 thread")
    p.add_argument("--order", default="sync,async", help="order of the arms (comma-separated)")
    p.add_argument("--eval-problems", type=int, default=500, help="held-out problems for the final accuracy")
    p.add_argument("--output", default="runs/bench_async", help="where the warm-up model goes by default")
    p.add_argument("overrides", nargs="*", help="config overrides key=value (on the quickstart config)")
    args, rest = p.parse_known_args(argv)
    unknown = [x for x in rest if x != "--json"]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    for key in ("steps", "sync_threads", "engine_threads", "trainer_threads", "eval_problems"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.eta < 0 or args.sft_steps < 0:
        raise ValueError("--eta and --sft-steps must be >= 0")
    if args.model and not (Path(args.model) / "config.json").exists():
        raise ValueError(f"--model {args.model}: no config.json there (a save_pretrained directory is needed)")
    arms = args.order.split(",")
    if sorted(arms) != ["async", "sync"]:
        raise ValueError(f"--order must name sync and async once each, got {args.order!r}")
    return args


def make_config(a):
    from thinkrl.config import load_config

    return load_config(QUICKSTART, ["log.progress=false", f"data.num_eval={a.eval_problems}", *a.overrides])


def prepare_model(cfg, a) -> tuple[str, dict]:
    if a.model:
        return a.model, {"source": a.model}
    from thinkrl.system.rundir import RunDir
    from thinkrl.system.setup import build_run
    from thinkrl.system.train import train_sft

    path = Path(a.save_model or Path(a.output) / f"sft{a.sft_steps}_seed{cfg.run.seed}")
    if (path / "config.json").exists():
        print(f"  warm-up model: reusing {path}")
        return str(path), {"source": f"{path} (reused)"}
    torch.set_num_threads(1)
    t = time.perf_counter()
    run = build_run(cfg)
    if a.sft_steps:
        train_sft(cfg, run=run, rundir=RunDir(Path(a.output) / "sft_log"), steps=a.sft_steps)
    run.model.save_pretrained(path)
    run.tokenizer.save_pretrained(path)
    info = {"source": f"micro + {a.sft_steps} SFT steps", "sft_seconds": time.perf_counter() - t}
    print(f"  warm-up: {info['source']} in {info['sft_seconds']:.0f}s -> {path}")
    return str(path), info


def _mean(ms: list[dict], key: str) -> float:
    vals = [m[key] for m in ms if key in m]
    return statistics.fmean(vals) if vals else 0.0


class _CPUTimed:
    """The trainer, with the CPU seconds of its calls counted (they run in the calling thread)."""

    def __init__(self, trainer):
        object.__setattr__(self, "_t", trainer)
        object.__setattr__(self, "cpu", 0.0)

    def _timed(self, fn, *args, **kw):
        c = time.thread_time()
        try:
            return fn(*args, **kw)
        finally:
            self.cpu += time.thread_time() - c

    def step(self, *args, **kw):
        return self._timed(self._t.step, *args, **kw)

    def logprobs(self, *args, **kw):
        return self._timed(self._t.logprobs, *args, **kw)

    def __getattr__(self, name):
        return getattr(self._t, name)


def run_arm(cfg, model_dir: str, arm: str, a) -> dict:
    """One arm from `model_dir`: RL for a.steps steps, then greedy accuracy on the held-out problems."""
    from thinkrl.eval.evaluate import evaluate
    from thinkrl.system.setup import build_run, make_inference_engine, make_workflow
    from thinkrl.train.engine import TrainEngine

    threads = {"sync": a.sync_threads, "sync1": 1, "async": a.trainer_threads}[arm]
    cfg.rollout.max_staleness = a.eta if arm == "async" else 0
    run = build_run(cfg, model_dir=model_dir)
    torch.set_num_threads(threads)  # after build_run, which applies run.threads
    trainer = TrainEngine(run.model, cfg.train, cfg.algo, autocast_bf16=cfg.model.autocast_bf16)
    local = make_inference_engine(cfg, run.model, run.tokenizer, version=trainer.version)
    workflow = make_workflow(cfg, run)
    ms: list[dict] = []
    res: dict = {"arm": arm, "threads": threads, "load_before": os.getloadavg()[0]}
    timed = _CPUTimed(trainer)
    from thinkrl.rollout.weights import WeightSync, make_weight_sync
    from thinkrl.system.loop import run_loop

    if arm == "async":
        from thinkrl.rollout.process import ProcessEngine

        t = time.perf_counter()
        child = ProcessEngine(run.model, run.tokenizer, version=trainer.version, threads=a.engine_threads)
        res["engine_start_seconds"] = time.perf_counter() - t
        child_cpu0 = child.stats()["cpu_seconds"]
        cpu0, t0 = time.process_time(), time.perf_counter()
        run_loop(cfg, timed, child, WeightSync([child]), workflow, run.train_samples, 0, a.steps,
                 lambda s, m: ms.append(m))
        wall = time.perf_counter() - t0
        res["engine_cpu_per_step"] = (child.stats()["cpu_seconds"] - child_cpu0) / a.steps
        child.close()
        local.load_weights(trainer.export_weights(), trainer.version)
    else:
        cpu0, t0 = time.process_time(), time.perf_counter()
        run_loop(cfg, timed, local, make_weight_sync("auto", [local]), workflow, run.train_samples, 0, a.steps,
                 lambda s, m: ms.append(m))
        wall = time.perf_counter() - t0
    res["main_cpu_per_step"] = (time.process_time() - cpu0) / a.steps  # all threads of this process
    res["train_cpu_per_step"] = timed.cpu / a.steps  # proximal log-probs + optimizer steps
    res["load_after"] = os.getloadavg()[0]
    tokens = sum(m["perf/train_tokens"] for m in ms)
    samples = len(ms) * cfg.rollout.batch_prompts * cfg.rollout.n
    res.update({
        "steps": len(ms), "wall_seconds": wall, "trained_tokens": tokens, "trained_samples": samples,
        "tokens_per_s": tokens / wall, "samples_per_s": samples / wall,
        "cpu_per_wall": (res["main_cpu_per_step"] + res.get("engine_cpu_per_step", 0.0)) * a.steps / wall,
        "reward_mean_last10": statistics.fmean(m["reward/mean"] for m in ms[-10:]),
        "response_len_mean": _mean(ms, "len/response_mean"),
        "train_seconds_per_step": _mean(ms, "perf/train_seconds_total") or _mean(ms, "perf/train_seconds"),
        "gen_or_wait_seconds_per_step": _mean(ms, "perf/wait_seconds") or _mean(ms, "perf/gen_seconds"),
        "sync_seconds_per_step": _mean(ms, "perf/sync_seconds"),
        "staleness_mean": _mean(ms, "staleness/mean"), "staleness_max": max(m.get("staleness/max", 0) for m in ms),
    })
    t = time.perf_counter()
    ev = evaluate(local, workflow, run.eval_samples, cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
                  correct_threshold=cfg.algo.correct_threshold, k=0, batch_size=cfg.eval.batch_size)
    res["accuracy"], res["eval_seconds"] = ev["pass@1"], time.perf_counter() - t
    local.close()
    workflow.close()  # its reward workers
    print(f"  {arm:6} {wall:7.1f}s  {res['tokens_per_s']:7.0f} tok/s  acc {res['accuracy']:.3f}  "
          f"load {res['load_before']:.1f}->{res['load_after']:.1f}")
    return res


def projection(cfg, res: dict, eta: int) -> dict:
    """What an idle 2-core machine would do, from CPU seconds measured in this run (insensitive to other load):
    - phase model: sync1 step = its CPU per step; async step = max(trainer CPU, engine CPU) per step (each on
      its own core); sync on 2 cores at best = sync1 / 2 (perfect scaling of every op).
    - simulator (thinkrl.tools.simulate), calibrated: decode cost scaled to the measured generation CPU,
      train_per_token from the measured training CPU; sync = sync1, colocated = sync on 2 cores with perfect
      scaling, async_partial = the async arm (its training cost includes the proximal log-prob pass)."""
    import dataclasses

    from thinkrl.tools.simulate import PRESETS, simulate

    s1, b = res["sync1"], res["async"]
    B = cfg.rollout.batch_prompts * cfg.rollout.n
    per_step_tokens = b["trained_tokens"] / b["steps"]
    gen = b["engine_cpu_per_step"]
    train_sync = max(s1["train_cpu_per_step"], 1e-6)
    train_async = b["train_cpu_per_step"]
    async_step = max(b["main_cpu_per_step"], gen)  # trainer + producer threads of this process | engine process
    out = {"gen_cpu_per_step": gen, "train_cpu_per_step_sync": train_sync, "train_cpu_per_step_async": train_async,
           "phase_ratio_vs_sync1": s1["main_cpu_per_step"] / max(async_step, 1e-9),
           "phase_ratio_vs_perfect_sync2": s1["main_cpu_per_step"] / 2 / max(async_step, 1e-9)}
    prompt = max(1, round(per_step_tokens / B - b["response_len_mean"]))
    base = dataclasses.replace(PRESETS["cpu"], batch_size=B, steps=max(b["steps"], 4), len_median=b["response_len_mean"],
                               len_sigma=0.3, max_len=cfg.rollout.max_new_tokens, prompt_len=prompt, sync_s=0.0)
    probe = simulate(dataclasses.replace(base, mode="sync", train_per_token=0.0, steps=4))
    f = gen / (probe.total_s / 4)
    base = dataclasses.replace(base, decode_a=base.decode_a * f, decode_b=base.decode_b * f,
                               prefill_per_token=base.prefill_per_token * f)
    sims = {m: simulate(dataclasses.replace(base, mode=m, max_staleness=eta,
                                            train_per_token=(train_async if m.startswith("async") else train_sync)
                                            / per_step_tokens)).tokens_per_s
            for m in ("sync", "colocated", "async_partial")}
    out.update({"sim_ratio_vs_sync1": sims["async_partial"] / sims["sync"],
                "sim_ratio_vs_colocated": sims["async_partial"] / sims["colocated"]})
    return out


def format_table(res: dict) -> str:
    lines = [f"{'arm':6} {'thr':>3} {'wall s':>7} {'tok/s':>6} {'acc':>6} {'train s':>7} {'gen|wait s':>10} "
             f"{'cpu s/step':>10} {'cpu/wall':>8} {'load':>10}", "-" * 84]
    for arm in ("sync", "sync1", "async"):
        r = res.get(arm)
        if r is None:
            continue
        cpu = r["main_cpu_per_step"] + r.get("engine_cpu_per_step", 0.0)
        lines.append(f"{arm:6} {r['threads']:>3} {r['wall_seconds']:>7.1f} {r['tokens_per_s']:>6.0f} "
                     f"{r['accuracy']:>6.3f} {r['train_seconds_per_step']:>7.2f} {r['gen_or_wait_seconds_per_step']:>10.2f} "
                     f"{cpu:>10.2f} {r['cpu_per_wall']:>8.2f} {r['load_before']:>4.1f}->{r['load_after']:<4.1f}")
    lines.append(f"ratio async/sync = {res['ratio']:.2f}x" + (f" (vs sync1: {res['ratio_vs_sync1']:.2f}x)"
                                                               if "ratio_vs_sync1" in res else "")
                 + f"   accuracy async - sync = {res['accuracy_delta']:+.3f}   staleness mean "
                 f"{res['async']['staleness_mean']:.2f} (max {res['async']['staleness_max']:.0f})")
    p = res.get("projection")
    if p:
        lines.append(f"idle-machine projection from CPU seconds: phase model {p['phase_ratio_vs_sync1']:.2f}x vs sync1, "
                     f"{p['phase_ratio_vs_perfect_sync2']:.2f}x vs perfectly scaled sync2; simulator "
                     f"{p['sim_ratio_vs_sync1']:.2f}x vs sync1, {p['sim_ratio_vs_colocated']:.2f}x vs colocated")
    return "\n".join(lines)


@register_bench("async", help="sync vs async RL (η=2) on the quickstart task: trained tokens/s ratio and accuracy")
def bench_async(argv: list[str]) -> dict:
    a = _args(argv)
    cfg = make_config(a)
    print(f"async bench: quickstart task, {a.steps} steps x {cfg.rollout.batch_prompts} prompts x {cfg.rollout.n} "
          f"samples per arm, eta={a.eta}, cores={os.cpu_count()}, load {os.getloadavg()[0]:.1f}")
    model_dir, info = prepare_model(cfg, a)
    res: dict = {"config": {k: getattr(a, k) for k in ("steps", "eta", "sync_threads", "engine_threads",
                                                        "trainer_threads", "eval_problems")},
                 "model": info, "cores": os.cpu_count()}
    arms = a.order.split(",") + ([] if a.no_sync1 or a.sync_threads == 1 else ["sync1"])
    for arm in arms:
        res[arm] = run_arm(make_config(a), model_dir, arm, a)
    if "sync1" not in res and a.sync_threads == 1:
        res["sync1"] = res["sync"]
    res["ratio"] = res["async"]["tokens_per_s"] / res["sync"]["tokens_per_s"]
    if "sync1" in res:
        res["ratio_vs_sync1"] = res["async"]["tokens_per_s"] / res["sync1"]["tokens_per_s"]
        res["ratio_vs_best_sync"] = res["async"]["tokens_per_s"] / max(res["sync"]["tokens_per_s"],
                                                                       res["sync1"]["tokens_per_s"])
        res["projection"] = projection(cfg, res, a.eta)
    res["accuracy_delta"] = res["async"]["accuracy"] - res["sync"]["accuracy"]
    res["load_end"] = os.getloadavg()[0]
    print(format_table(res))
    return res
