"""`thinkrl train` and `thinkrl sft`: runs with a run directory, metrics, checkpoints and exact resume.

    final = train_rl(cfg, resume=False)
    trainer, steps = train_sft(cfg, resume=False)

train_rl builds the parts (policy, trainer, critic, engines, workflow), restores them from the newest good
checkpoint on resume, runs the one loop (thinkrl.system.loop) and evaluates. An RL checkpoint holds everything
continuing needs: HF weights, optimizer and scheduler, RNG states, step, policy version, critic, LoRA adapters,
and the rollouts already generated or in flight with their staleness accounting (the data position is the
step: prompts are a pure function of (seed, step)).
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from tqdm.auto import tqdm

from thinkrl.eval.evaluate import evaluate
from thinkrl.system.checkpoint import load_state, load_weights_into, rng_state, set_rng_state
from thinkrl.system.loop import run_loop
from thinkrl.system.placement import place_rollouts, threads_for_trainer, with_threads
from thinkrl.system.rundir import RunDir
from thinkrl.system.setup import build_run, make_inference_engine, make_workflow
from thinkrl.train.critic import Critic
from thinkrl.train.engine import TrainEngine
from thinkrl.train.sft import build_file_examples, build_sft_examples, demonstrations, run_sft
from thinkrl.train.teacher import Teacher


def _progress(total: int, initial: int, desc: str, enabled: bool):
    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, leave=True)


def eval_max_tokens(cfg) -> int:
    return cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens


def run_eval(cfg, engine, run, k: int | None = None, workflow=None) -> dict:
    """Held-out accuracy through the task's workflow (the one training runs: pass it to reuse its prompt cache),
    at algo.correct_threshold. A workflow made here is closed after (its reward workers stopped)."""
    wf = workflow or make_workflow(cfg, run)
    try:
        return evaluate(engine, wf, run.eval_samples, eval_max_tokens(cfg),
                        correct_threshold=cfg.algo.correct_threshold, k=cfg.eval.k if k is None else k,
                        temperature=cfg.eval.temperature, batch_size=cfg.eval.batch_size,
                        price_per_mtok=cfg.eval.price_per_mtok, extract_answer=run.task.extract_answer)
    finally:
        if workflow is None:
            wf.close()


def trainable_policy(cfg, run, state: dict | None, ckpt) -> tuple[object, object]:
    """(the model the trainer optimises, the model whose weights the engine and the checkpoints get). With
    model.lora_r > 0 the trainer optimises adapters on a wrapped policy over the run's base weights, and the engine
    model is a copy that gets the merged weights; a resumed run restores the adapters themselves (state["lora"]),
    a full run the checkpoint's weights."""
    policy = engine_model = run.model
    if cfg.model.lora_r > 0:
        from thinkrl.models.lora import apply_lora

        engine_model = copy.deepcopy(run.model)
        policy = apply_lora(run.model, cfg.model)
    if state is not None:
        if cfg.model.lora_r > 0:
            policy.load_state_dict(state["lora"], strict=False)
        else:
            load_weights_into(run.model, ckpt)
    return policy, engine_model


def _adapters(policy) -> dict:
    return {k: v.detach().clone() for k, v in policy.state_dict().items() if "lora_" in k}


def train_rl(cfg, resume: bool = False, run=None, rundir: RunDir | None = None, time_budget: float | None = None) -> dict:
    """RL from cfg (model from cfg.run.init_from or cfg.model). Returns the final eval metrics."""
    rundir = rundir or RunDir(cfg.run.output_dir)
    ckpt = rundir.resume_point() if resume else None  # None on resume: stopped before its first checkpoint
    rundir.write_config(cfg, resume)  # on resume: first checks that the config would not change the results
    run = run or build_run(cfg)
    state = load_state(ckpt) if ckpt is not None else None
    policy, engine_model = trainable_policy(cfg, run, state, ckpt)  # LoRA: adapters; the engine gets merged weights
    trainer = TrainEngine(policy, cfg.train, cfg.algo, autocast_bf16=cfg.model.autocast_bf16)
    critic = Critic.maybe_create(cfg, run)  # value model for algo.advantage=gae, else None
    teacher = Teacher.maybe_create(cfg, run.tokenizer, trainer.device)  # algo.distill_teacher, else None
    start, restore = 0, None
    if state is not None:
        trainer.load_state_dict(state["trainer"])
        if critic is not None:
            critic.load_state_dict(state["critic"])
        set_rng_state(state["rng"])
        start, restore = state["step"], state["rollouts"]
        rundir.truncate_metrics(start)
    if engine_model is not policy:
        engine_model.load_state_dict(trainer.export_weights())

    def save(step: int, loop_state: dict, keep_all: bool = False) -> None:
        if engine_model is not policy:
            engine_model.load_state_dict(trainer.export_weights())
        st = {"step": step, "trainer": trainer.state_dict(), "rng": rng_state(), **loop_state}
        if critic is not None:
            st["critic"] = critic.state_dict()
        if cfg.model.lora_r > 0:
            st["lora"] = _adapters(policy)
        rundir.save_checkpoint(step, engine_model, run.tokenizer, st, None if keep_all else cfg.train.keep_checkpoints)

    engine = make_inference_engine(cfg, engine_model, run.tokenizer, version=trainer.version)
    workflow = make_workflow(cfg, run)
    bar = _progress(cfg.train.steps, start, "rl", cfg.log.progress)
    t0 = time.perf_counter()
    placed = None

    def eval_engine():
        """The in-process engine evaluates; with the rollouts elsewhere it first gets the trainer's weights."""
        if cfg.cluster.backend == "ray" or (placed is not None and placed.engine is not engine):
            engine.load_weights(trainer.export_weights(), trainer.version)
        return engine

    def on_step(step: int, m: dict) -> None:
        m = {"step": step, "time": time.perf_counter() - t0, **m}
        if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.train.steps:
            m.update({f"eval/{k}": v for k, v in run_eval(cfg, eval_engine(), run, k=0, workflow=workflow).items()})
        rundir.log(m)
        bar.set_postfix(reward=f"{m['reward/mean']:.3f}", acc=f"{m['acc/mean']:.3f}", refresh=False)
        bar.update(1)

    args = (workflow, run.train_samples, start, cfg.train.steps, on_step, save, time_budget, critic, restore)
    try:
        rundir.open_logs(cfg, start)  # metrics.jsonl and log.backends; a resumed run continues its logs
        if cfg.cluster.backend == "ray":
            from thinkrl.system.ray_ import run_ray

            last = run_ray(cfg, trainer, engine, *args)
        else:
            placed = place_rollouts(cfg, engine, engine_model, run.tokenizer, trainer.version)
            try:
                last = with_threads(threads_for_trainer(cfg, placed.process and trainer.device.type == "cpu"),
                                    lambda: run_loop(cfg, trainer, placed.engine, placed.sync, *args, teacher=teacher))
            finally:
                placed.close()
        bar.close()
        final = run_eval(cfg, eval_engine(), run, workflow=workflow)
    finally:
        engine.close()
        rundir.close_logs()
        workflow.close()
    final["steps"] = last
    (rundir.path / "eval.json").write_text(json.dumps(final, indent=2))
    return final


def write_teacher_file(run, directory) -> Path:
    """DIRECTORY/teacher.jsonl: the task's demonstrations on the run's training problems as chat-format rows, the
    file data.sft_path names when the quickstart trains on its teacher (the same examples `thinkrl sft` makes)."""
    from thinkrl.data.files import write_conversations

    convs = demonstrations(run.task, run.train_samples, seed=run.cfg.run.seed)
    return write_conversations(Path(directory) / "teacher.jsonl", convs)


def sft_examples(cfg, run) -> list[tuple[list[int], list[bool]]]:
    """(ids, assistant mask) of every SFT example: the chat-format file data.sft_path when set, else the task's
    demonstrations on the run's training problems."""
    d = cfg.data
    if d.sft_path:
        from thinkrl.data.files import load_conversations

        convs = load_conversations(d.sft_path, d.sft_messages_field, d.sft_prompt_field, d.sft_response_field)
        positions = getattr(getattr(run.model, "config", None), "max_position_embeddings", 0) or 0
        return build_file_examples(run.tokenizer, convs, positions, cfg.train.max_tokens_per_mb)
    return build_sft_examples(run.tokenizer, run.task, run.train_samples, seed=cfg.run.seed)


def train_sft(cfg, run=None, rundir: RunDir | None = None, steps: int | None = None, time_budget: float | None = None,
              trainer: TrainEngine | None = None, start_step: int = 0, resume: bool = False) -> tuple[TrainEngine, int]:
    """SFT on `sft_examples` (data.sft_path, else the task's demonstrations) from step `start_step` to
    `start_step + steps` (default train.sft_steps), checkpointed every train.save_every steps (when > 0) and at
    the end, evaluated every eval.sft_every steps (greedy pass@1 on the eval problems, eval/* in the metrics).
    Step s trains on a batch that is a function of (run.seed, s) only, so `resume` (continue from the run dir's
    last good checkpoint: weights or LoRA adapters, optimizer, scheduler, RNG, step) gives the uninterrupted
    run's results. With model.lora_r > 0 only adapters train; checkpoints hold the merged weights (and the
    adapters), and run.model ends as the plain model with the adapters merged in. Returns (trainer, steps done)."""
    rundir = rundir or RunDir(cfg.run.output_dir)
    rundir.write_config(cfg, resume)  # on resume: first checks that the config would not change the results
    run = run or build_run(cfg)
    examples = sft_examples(cfg, run)  # bad data stops here, before anything trains
    if cfg.eval.sft_every and not run.eval_samples:
        raise ValueError("eval.sft_every: the run has no eval problems (data.eval_path or a task generator)")
    total = steps if steps is not None else cfg.train.sft_steps
    end = start_step + total if time_budget is None else 10**9
    ckpt = rundir.resume_checkpoint() if resume else None
    state = load_state(ckpt) if ckpt is not None else None
    if trainer is not None and cfg.model.lora_r > 0:
        raise ValueError("model.lora_r > 0: SFT continues only its own LoRA run (--resume), not a trainer handed over "
                         "(the quickstart's --control needs model.lora_r=0)")
    lora = cfg.model.lora_r > 0
    policy = plain = run.model  # LoRA: the adapters train on `policy`; `plain` holds the merged weights
    if lora:
        from thinkrl.models.lora import apply_lora

        plain = copy.deepcopy(run.model)
        policy = apply_lora(run.model, cfg.model)
    if state is not None:
        if lora:
            policy.load_state_dict(state["lora"], strict=False)
        else:
            load_weights_into(run.model, ckpt)
    if trainer is None:
        trainer = TrainEngine(policy, cfg.train, cfg.algo, lr=cfg.train.sft_lr, total_steps=total,
                              autocast_bf16=cfg.model.autocast_bf16, warmup_steps=cfg.train.sft_warmup_steps)
    saved = -1
    if state is not None:
        trainer.load_state_dict(state["trainer"])
        set_rng_state(state["rng"])
        start_step = saved = state["step"]
        rundir.truncate_metrics(start_step)
    bar = _progress(None if time_budget else end - start_step, 0, "sft", cfg.log.progress)

    def merged():
        if lora:
            plain.load_state_dict(trainer.export_weights())
        return plain

    def save(step: int) -> None:
        nonlocal saved
        state = {"trainer": trainer.state_dict(), "rng": rng_state()}
        if lora:
            state["lora"] = _adapters(policy)
        rundir.save_checkpoint(step, merged(), run.tokenizer, state, cfg.train.keep_checkpoints)
        saved = step

    def evaluate_now() -> dict:
        model = merged()
        model.eval()
        engine = make_inference_engine(cfg, model, run.tokenizer)
        try:
            return {f"eval/{k}": v for k, v in run_eval(cfg, engine, run, k=0).items()}
        finally:
            engine.close()

    def on_step(step: int, m: dict) -> None:
        m = {"step": step, "phase": "sft", **m}
        if cfg.eval.sft_every and step % cfg.eval.sft_every == 0:
            m.update(evaluate_now())
        rundir.log(m)
        bar.set_postfix(loss=f"{m['loss/sft']:.3f}", refresh=False)
        bar.update(1)
        if cfg.train.save_every and step % cfg.train.save_every == 0:
            save(step)

    rundir.open_logs(cfg, start_step)  # metrics.jsonl and log.backends; a resumed run continues its logs
    try:
        done = run_sft(trainer, examples, end, cfg.train.sft_batch_size, seed=cfg.run.seed, start_step=start_step,
                       time_budget=time_budget, on_step=on_step, max_bad_steps=cfg.train.max_bad_steps)
    finally:
        rundir.close_logs()
    bar.close()
    if start_step + done != saved:
        save(start_step + done)
    if lora:  # run.model back to a plain module (peft's layers removed), with the trained weights
        weights = merged().state_dict()
        policy.unload()
        run.model.load_state_dict(weights)
    return trainer, done
