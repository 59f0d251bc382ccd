"""`thinkrl bench rl-step`: one RL step of thinkrl against TRL's `GRPOTrainer`, side by side in one run.

Both sides start from the same model (the quickstart micro model after a short SFT warm-up on the
arithmetic task, or `--model DIR`), saved once with `save_pretrained` and loaded fresh for each side.
Same prompts in the same order (thinkrl's `batch_for_step` order; TRL reads them unshuffled), P prompts x
n samples, at most T new tokens (both stop at the tokenizer's EOS `<|end|>`), temperature 1, beta = 0,
one optimizer update per batch (thinkrl: algo.ppo_epochs=1; TRL: num_iterations=1, one generation batch
of P*n completions per optimizer step), the same lr / clip / grad clip / Adam betas, token-mean loss
(TRL loss_type="dapo") and group-std GRPO advantages on both.

thinkrl runs through its public pieces (build_run, TrainEngine, make_inference_engine, run_loop), so
improvements to the engine and trainer show up here unchanged. Timing: each side runs `--warmup`
untimed steps, then `--steps` timed ones (TRL: between consecutive optimizer-step ends); wall seconds
(perf_counter) and process CPU seconds (process_time, less sensitive to other processes sharing the
cores) per step. `ratio` = TRL / thinkrl.
The SFT warm-up takes minutes on a CPU: keep it with `--save-model DIR`, reuse it with `--model DIR`.
`--device cuda` runs both sides on the GPU (it fails at once without one; steps are timed after synchronising
it) and names the GPU in the JSON; `--hidden`/`--layers`/... size the micro model (e.g. a compute-bound 1024 x
8 on a GPU). `--skip-trl` runs thinkrl alone (where TRL is not installed); the JSON then says so and has no ratio.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from thinkrl.bench import register_bench

TRL_HINT = "the rl-step benchmark needs TRL: pip install 'thinkrl[bench]'"
# thinkrl's algo.loss_agg -> the TRL loss_type that aggregates the same way (token-mean over the whole batch, ...)
TRL_LOSS_TYPE = {"token-mean": "dapo", "seq-mean-token-mean": "grpo", "seq-mean-token-sum-norm": "dr_grpo"}
QUICKSTART = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="thinkrl bench rl-step")
    p.add_argument("--steps", type=int, default=5, help="timed RL steps per side")
    p.add_argument("--warmup", type=int, default=1, help="untimed RL steps per side before the timed ones")
    p.add_argument("--model", default="", help="start from this HF model directory (skips the SFT warm-up)")
    p.add_argument("--save-model", default="", help="keep the SFT warm-up model here (reuse it with --model)")
    p.add_argument("--sft-steps", type=int, default=300, help="SFT warm-up steps when no --model is given")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads for both sides")
    p.add_argument("--prompts", type=int, default=16, help="prompts per RL step")
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.0, help="RL learning rate (0: the quickstart config's algo.lr)")
    p.add_argument("--num-train", type=int, default=20000, help="generated training problems")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu | cuda[:N] (both sides; fails at once when absent)")
    p.add_argument("--skip-trl", action="store_true", help="thinkrl alone (no TRL side, no ratio)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on both sides (model.autocast_bf16=true)")
    for name in ("hidden", "layers", "heads", "kv-heads", "intermediate"):
        p.add_argument(f"--{name}", type=int, default=0, help=f"micro model {name} (0: the quickstart config's)")
    args, rest = p.parse_known_args(argv)
    unknown = [x for x in rest if x != "--json"]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    for key in ("steps", "prompts", "max_new_tokens", "threads", "num_train"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.n < 2:
        raise ValueError(f"--n must be >= 2 (GRPO needs a group), got {args.n}")
    if args.warmup < 0 or args.sft_steps < 0:
        raise ValueError("--warmup and --sft-steps must be >= 0")
    if args.model and not (Path(args.model) / "config.json").exists():
        raise ValueError(f"--model {args.model}: not a Hugging Face model directory (no config.json)")
    return args


def _require_trl():
    try:
        import datasets  # noqa: F401
        import trl
    except ImportError as e:
        print(f"WARNING: {TRL_HINT} ({e})")
        raise ValueError(f"{TRL_HINT} ({e})") from None
    return trl


def make_config(a: argparse.Namespace):
    """The quickstart config with the benchmark's overrides."""
    from thinkrl.config import load_config

    ov = [f"rollout.batch_prompts={a.prompts}", f"rollout.n={a.n}", f"rollout.max_new_tokens={a.max_new_tokens}",
          "algo.kl_coef=0", "algo.ppo_epochs=1", "algo.loss=ppo", "rollout.max_staleness=0",  # TRL's step: sync PPO-clip
          f"run.seed={a.seed}", f"run.threads={a.threads if a.device == 'cpu' else 0}",  # CPU threads on the CPU
          f"run.device={a.device}", f"data.num_train={a.num_train}", "data.num_eval=16", "log.progress=false"]
    if a.lr:
        ov.append(f"algo.lr={a.lr}")
    if a.bf16:
        ov.append("model.autocast_bf16=true")
    for arg, key in (("hidden", "hidden_size"), ("layers", "num_layers"), ("heads", "num_heads"),
                     ("kv_heads", "num_kv_heads"), ("intermediate", "intermediate_size")):
        if getattr(a, arg):
            ov.append(f"model.{key}={getattr(a, arg)}")
    return load_config(QUICKSTART, ov)


def prepare_model(cfg, a, out: Path) -> tuple[str, dict]:
    """The starting model directory: --model, or a fresh micro model after a short SFT warm-up."""
    if a.model:
        return a.model, {"source": a.model}
    from thinkrl.system.rundir import RunDir
    from thinkrl.system.setup import build_run
    from thinkrl.system.train import train_sft

    t = time.perf_counter()
    run = build_run(cfg)
    if a.sft_steps:
        train_sft(cfg, run=run, rundir=RunDir(out / "sft_log"), steps=a.sft_steps)
    path = Path(a.save_model) if a.save_model else out / "init"
    run.model.save_pretrained(path)
    run.tokenizer.save_pretrained(path)
    info = {"source": f"micro + {a.sft_steps} SFT steps", "sft_seconds": time.perf_counter() - t}
    print(f"  warm-up: {info['source']} in {info['sft_seconds']:.0f}s -> {path}")
    return str(path), info


def step_samples(cfg, train: list, total_steps: int) -> list:
    """The samples of RL steps 0..total_steps-1, in the order thinkrl's sync controller takes them."""
    from thinkrl.data import batch_for_step

    P, seed, shuffle = cfg.rollout.batch_prompts, cfg.run.seed, cfg.data.shuffle
    return [s for k in range(total_steps) for s in batch_for_step(train, k, P, seed, shuffle)]


def task_and_samples(cfg, total_steps: int) -> tuple[object, list]:
    from thinkrl.data import load_task_data
    from thinkrl.tasks import make_task

    task = make_task(cfg.task.name, cfg.task.params, cfg.task.system_prompt)
    return task, step_samples(cfg, load_task_data(cfg, task)[0], total_steps)


def _summary(walls: list[float], cpus: list[float], rewards: list[float], lens: list[float], warmup: int) -> dict:
    tw, tc, tr, tl = walls[warmup:], cpus[warmup:], rewards[warmup:], lens[warmup:]
    return {"s_per_step": statistics.mean(tw), "cpu_s_per_step": statistics.mean(tc),
            "reward_mean": statistics.mean(tr), "reward_last": tr[-1], "completion_len": statistics.mean(tl),
            "step_seconds": walls, "rewards": rewards}


def run_thinkrl(cfg, model_dir: str, total: int, warmup: int, expect_ids: list[str]) -> dict:
    from thinkrl.device import synchronize
    from thinkrl.rollout.weights import make_weight_sync
    from thinkrl.system.loop import run_loop
    from thinkrl.system.setup import build_run, make_inference_engine, make_workflow
    from thinkrl.train.engine import TrainEngine

    run = build_run(cfg, model_dir=model_dir)
    if [s.id for s in step_samples(cfg, run.train_samples, total)] != expect_ids:
        raise RuntimeError("rl-step bench: thinkrl's prompts differ from the ones given to TRL")
    trainer = TrainEngine(run.model, cfg.train, cfg.algo, autocast_bf16=cfg.model.autocast_bf16)
    engine = make_inference_engine(cfg, run.model, run.tokenizer, version=trainer.version)
    workflow = make_workflow(cfg, run)
    walls, cpus, rewards, lens, gen, train = [], [], [], [], [], []
    mark = [time.perf_counter(), time.process_time()]

    def on_step(step: int, m: dict) -> None:  # the loop's own step (η = 0): generate, train, update weights
        synchronize(run.device)
        walls.append(time.perf_counter() - mark[0])
        cpus.append(time.process_time() - mark[1])
        rewards.append(m["reward/mean"])
        lens.append(m["len/response_mean"])
        gen.append(m["perf/wait_seconds"])
        train.append(m.get("perf/train_seconds", float("nan")))
        print(f"  thinkrl step {step - 1}: {walls[-1]:.2f}s (cpu {cpus[-1]:.2f}s, generation {gen[-1]:.2f}s, "
              f"train {train[-1]:.2f}s) reward {rewards[-1]:.3f} len {lens[-1]:.1f}", flush=True)
        mark[:] = [time.perf_counter(), time.process_time()]

    sync = make_weight_sync(cfg.rollout.weight_sync, [engine])
    try:
        run_loop(cfg, trainer, engine, sync, workflow, run.train_samples, 0, total, on_step)
    finally:
        sync.close()
        engine.close()
        workflow.close()  # its reward workers
    res = _summary(walls, cpus, rewards, lens, warmup)
    res["gen_s_per_step"] = statistics.mean(gen[warmup:])
    res["train_s_per_step"] = statistics.mean(train[warmup:])
    res["threads"] = torch.get_num_threads()
    del engine, trainer, run
    gc.collect()
    return res


def _trl_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall and CPU seconds between consecutive optimizer-step ends (the first from train begin); logs."""

        def __init__(self):
            self.walls, self.cpus, self.logs, self.threads = [], [], [], 0

        def on_train_begin(self, args, state, control, **kw):
            self.t, self.c = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            t, c = time.perf_counter(), time.process_time()
            self.walls.append(t - self.t)
            self.cpus.append(c - self.c)
            self.t, self.c, self.threads = t, c, torch.get_num_threads()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                self.logs.append(dict(logs))
                print(f"  trl step {len(self.logs) - 1}: {self.walls[-1]:.2f}s (cpu {self.cpus[-1]:.2f}s) "
                      f"reward {logs['reward']:.3f} len {logs.get('completions/mean_length', float('nan')):.1f}",
                      flush=True)

    return StepTimer()


def run_trl(cfg, model_dir: str, task, samples: list, total: int, warmup: int, out: Path) -> dict:
    """TRL's GRPOTrainer on the same model, prompts and settings; one optimizer step = P*n completions."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from thinkrl.models.loading import load_tokenizer

    r, al, tr = cfg.rollout, cfg.algo, cfg.train
    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if cfg.run.device != "cpu":
        model = model.to(cfg.run.device)
    # TRL stops at tok.eos_token_id (+ generation_config.eos_token_id): make sure both are our <|end|>
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    ds = Dataset.from_list([{"prompt": task.build_prompt(s), "idx": i} for i, s in enumerate(samples)])

    def reward(prompts, completions, idx, **kw):  # TRL: (prompts, completions, completion_ids, **columns)
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [float(task.reward(t, samples[i])) for t, i in zip(texts, idx)]

    timer = _trl_timer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 deprecations called from inside TRL
        args = GRPOConfig(
            output_dir=str(out / "trl"), num_generations=r.n,
            per_device_train_batch_size=r.batch_prompts * r.n, gradient_accumulation_steps=1,
            max_completion_length=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
            top_k=r.top_k, beta=0.0, num_iterations=1, epsilon=al.clip_low, epsilon_high=al.clip_high,
            loss_type=TRL_LOSS_TYPE[al.loss_agg], scale_rewards="group" if al.norm_std else "none", learning_rate=al.lr,
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=tr.weight_decay, adam_beta1=tr.betas[0],
            adam_beta2=tr.betas[1], max_grad_norm=tr.grad_clip, max_steps=total, logging_steps=1, report_to="none",
            save_strategy="no", use_cpu=cfg.run.device == "cpu", bf16=cfg.model.autocast_bf16, seed=cfg.run.seed,
            shuffle_dataset=False,
            disable_tqdm=True, dataloader_num_workers=0,
        )
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                              callbacks=[timer])
        trainer.remove_callback(PrinterCallback)  # our timer prints one line per step instead
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        trainer.train()
    if len(timer.logs) != total or len(timer.walls) != total:
        raise RuntimeError(f"rl-step bench: TRL ran {len(timer.walls)} steps ({len(timer.logs)} logged), "
                           f"expected {total}")
    res = _summary(timer.walls, timer.cpus, [g["reward"] for g in timer.logs],
                   [g["completions/mean_length"] for g in timer.logs], warmup)
    res["threads"] = timer.threads
    del trainer, model
    gc.collect()
    return res


def _versions(with_trl: bool = True) -> dict:
    import transformers

    v = {"torch": torch.__version__, "transformers": transformers.__version__}
    if with_trl:
        import trl

        v["trl"] = trl.__version__
    return v


def format_table(res: dict) -> str:
    lines = [f"{'':8} {'s/step':>8} {'cpu s/step':>10} {'reward mean':>11} {'reward last':>11} {'completion len':>14}",
             "-" * 67]
    sides = ("thinkrl", "trl") if "ratio" in res else ("thinkrl",)
    for side in sides:
        lines.append(f"{side:8} {res[f'{side}_s_per_step']:>8.2f} {res[f'{side}_cpu_s_per_step']:>10.2f} "
                     f"{res[f'{side}_reward_mean']:>11.3f} {res[f'{side}_reward_last']:>11.3f} "
                     f"{res[f'{side}_completion_len']:>14.1f}")
    if "ratio" in res:
        lines.append(f"ratio TRL / thinkrl: {res['ratio']:.2f}x wall, {res['cpu_ratio']:.2f}x CPU time")
    else:
        lines.append(f"trl: {res['trl']}")
    return "\n".join(lines)


@register_bench("rl-step", help="seconds per RL step and reward: thinkrl vs TRL's GRPOTrainer (needs thinkrl[bench])")
def bench_rl_step(argv: list[str]) -> dict:
    from thinkrl.device import device_name, resolve_device

    a = _args(argv)
    device = resolve_device(a.device)  # cuda without a GPU fails here, before any work
    if not a.skip_trl:
        _require_trl()
    if device.type == "cpu":
        torch.set_num_threads(a.threads)
    cfg = make_config(a)
    total = a.warmup + a.steps
    settings = {"prompts": a.prompts, "n": a.n, "max_new_tokens": a.max_new_tokens, "beta": 0.0,
                "updates_per_batch": 1, "lr": cfg.algo.lr, "temperature": cfg.rollout.temperature,
                "clip": [cfg.algo.clip_low, cfg.algo.clip_high], "loss_agg": cfg.algo.loss_agg, "steps": a.steps,
                "warmup": a.warmup, "threads": a.threads, "seed": a.seed, "device": a.device,
                "device_name": device_name(device), "bf16_autocast": a.bf16,
                "model": {k: getattr(cfg.model, k) for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads",
                                                             "intermediate_size")}}
    print(f"rl-step bench: {a.prompts} prompts x {a.n} samples, max {a.max_new_tokens} new tokens, beta 0, "
          f"1 update per batch, lr {cfg.algo.lr:g}, {torch.get_num_threads()} CPU threads, "
          f"{a.steps} timed steps (+{a.warmup} warm-up), on {device} ({device_name(device)})")
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the "Loading weights" bars of each from_pretrained
    try:
        with tempfile.TemporaryDirectory(prefix="thinkrl-bench-rl-") as tmp:
            out = Path(tmp)
            model_dir, init = prepare_model(cfg, a, out)
            task, samples = task_and_samples(cfg, total)
            th = run_thinkrl(cfg, model_dir, total, a.warmup, [s.id for s in samples])
            tl = None if a.skip_trl else run_trl(cfg, model_dir, task, samples, total, a.warmup, out)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    res = {f"thinkrl_{k}": v for k, v in th.items()}
    if tl is None:
        res["trl"] = "skipped (--skip-trl): thinkrl alone, no ratio"
    else:
        res |= {f"trl_{k}": v for k, v in tl.items()}
        res.update(ratio=tl["s_per_step"] / th["s_per_step"], cpu_ratio=tl["cpu_s_per_step"] / th["cpu_s_per_step"])
    res.update(settings=settings, init=init, versions=_versions(with_trl=tl is not None))
    print(format_table(res))
    return res
