"""`thinkrl dpo`: DPO on preference pairs, with a run directory, metrics, checkpoints and exact resume.

    model, steps = train_dpo(cfg)                         # pairs from cfg.dpo.path
    model, steps = train_dpo(cfg, run=run, pairs=pairs)   # pairs made in code (the quickstart's delta pairs)

The reference log-probs are computed once, before the first step, with the starting weights (no second model
is held) and saved in every checkpoint, so a resumed run uses the same reference. Step s trains on the pairs
`BatchOrder(len(pairs), dpo.batch_size, run.seed).batch(s)`: a resumed run sees the batches the uninterrupted
run would have. A checkpoint holds the weights (LoRA: merged, the adapters in the state), the optimizer and
scheduler, the RNG states, the step and the reference log-probs.
"""
from __future__ import annotations

import dataclasses

from tqdm.auto import tqdm

from thinkrl.data.pairs import Pair, encode_pair, read_pairs
from thinkrl.system.checkpoint import load_state, rng_state, set_rng_state
from thinkrl.system.rundir import RunDir
from thinkrl.system.setup import build_run
from thinkrl.system.train import trainable_policy
from thinkrl.train.dpo import dpo_step, pair_logps
from thinkrl.train.engine import TrainEngine, stop_on_bad_steps
from thinkrl.train.sft import BatchOrder


def load_pairs(cfg) -> list[Pair]:
    if not cfg.dpo.path:
        raise ValueError("dpo.path: empty; name a JSONL file of preference pairs (prompt, chosen, rejected)")
    return read_pairs(cfg.dpo.path)


def train_dpo(cfg, run=None, rundir: RunDir | None = None, pairs: list[Pair] | None = None,
              resume: bool = False) -> tuple[object, int]:
    """dpo.steps DPO steps from run.init_from (or cfg.model). Returns (the trained model, steps done)."""
    pairs = pairs if pairs is not None else load_pairs(cfg)  # bad input stops here, before anything is written
    if not pairs:
        raise ValueError("thinkrl dpo: no pairs")
    if cfg.dpo.max_pairs:
        pairs = pairs[: cfg.dpo.max_pairs]
    if cfg.train.world_size > 1:
        raise ValueError("thinkrl dpo: train.world_size > 1 is not supported; use train.world_size=1")
    rundir = rundir or RunDir(cfg.run.output_dir)
    rundir.write_config(cfg, resume)  # on resume: first checks that the config would not change the results
    run = run or build_run(cfg)
    toks = [encode_pair(run.tokenizer, p) for p in pairs]
    ckpt = rundir.resume_checkpoint() if resume else None
    state = load_state(ckpt) if ckpt is not None else None
    policy, engine_model = trainable_policy(cfg, run, state, ckpt)  # LoRA: adapters over the base weights
    acfg = dataclasses.replace(cfg.algo, kl_coef=0.0)  # no RL reference copy: DPO's reference log-probs are below
    trainer = TrainEngine(policy, cfg.train, acfg, lr=cfg.dpo.lr, total_steps=cfg.dpo.steps,
                          autocast_bf16=cfg.model.autocast_bf16, warmup_steps=cfg.dpo.warmup_steps)
    start = 0
    needs_ref = cfg.dpo.loss != "simpo"
    if state is not None:
        trainer.load_state_dict(state["trainer"])
        set_rng_state(state["rng"])
        start, ref = state["step"], state["ref"]
        rundir.truncate_metrics(start)
    else:
        ref = pair_logps(trainer, toks) if needs_ref else None  # once, with the starting weights
    order = BatchOrder(len(toks), min(cfg.dpo.batch_size, len(toks)), cfg.run.seed)
    saved = start if state is not None else -1

    def save(step: int) -> None:
        nonlocal saved
        if engine_model is not policy:
            engine_model.load_state_dict(trainer.export_weights())
        st = {"step": step, "trainer": trainer.state_dict(), "rng": rng_state(), "ref": ref}
        if cfg.model.lora_r > 0:
            st["lora"] = {k: v.detach().clone() for k, v in policy.state_dict().items() if "lora_" in k}
        rundir.save_checkpoint(step, engine_model, run.tokenizer, st, cfg.train.keep_checkpoints)
        saved = step

    bar = tqdm(total=cfg.dpo.steps, initial=start, desc="dpo", disable=not cfg.log.progress, dynamic_ncols=True)
    rundir.open_logs(cfg, start)
    step = start
    try:
        while step < cfg.dpo.steps:
            idx = order.batch(step)
            m = dpo_step(trainer, [toks[i] for i in idx], [ref[i] for i in idx] if ref is not None else None, cfg.dpo)
            step += 1
            rundir.log({"step": step, "phase": "dpo", **m})
            bar.set_postfix(loss=f"{m['dpo/loss']:.3f}", acc=f"{m['dpo/reward_acc']:.2f}", refresh=False)
            bar.update(1)
            if cfg.train.save_every and step % cfg.train.save_every == 0:
                save(step)
            stop_on_bad_steps(m, cfg.train.max_bad_steps, step)
    finally:
        rundir.close_logs()
        bar.close()
    if step != saved:
        save(step)
    if engine_model is not policy:
        engine_model.load_state_dict(trainer.export_weights())
    return engine_model, step - start
