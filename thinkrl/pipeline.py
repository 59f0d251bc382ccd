"""`thinkrl quickstart --pipeline sft,dpo,rl [--control]`: the post-training pipeline on the micro model.

micro model -> SFT on the imperfect teacher -> DPO on delta pairs -> RL (GRPO) from the DPO model, each stage's
held-out greedy accuracy printed; [--control: from the same SFT checkpoint, more SFT for the wall time of every
stage after SFT]. Run dirs sft/, dpo/, rl/, sft_more/ (each with eval.json), summary.json, report.html.

Delta pairs (Olmo 3's delta learning: the gap between the two answers matters more than the chosen one's
quality): for each training problem, chosen = the quickstart's teacher, rejected = a weaker teacher that always
drops carries (`Arithmetic.weak_demonstration`); pairs with equal answers are dropped, so what remains are the
problems with a carry that the teacher works correctly.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path

from thinkrl.config import DPOConfig
from thinkrl.data.pairs import Pair
from thinkrl.system.checkpoint import load_state
from thinkrl.system.dpo import train_dpo
from thinkrl.system.rundir import RunDir
from thinkrl.system.setup import make_inference_engine
from thinkrl.system.train import run_eval, train_rl, train_sft, write_teacher_file
from thinkrl.tools.report import write_report

STAGES = ("sft", "dpo", "rl")


def parse_stages(text: str) -> list[str]:
    """'sft,dpo,rl' -> ['sft', 'dpo', 'rl']; stages in this order, starting with sft, each at most once."""
    stages = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise ValueError(f"--pipeline: unknown stage {bad[0]!r}; valid: {', '.join(STAGES)}")
    if not stages or stages[0] != "sft" or stages != sorted(stages, key=STAGES.index) or len(set(stages)) < len(stages):
        raise ValueError(f"--pipeline {text!r}: stages run in the order sft,dpo,rl, start with sft, each once")
    return stages


def delta_pairs(task, samples) -> list[Pair]:
    """Chosen: task.demonstration (the teacher); rejected: task.weak_demonstration; equal answers dropped."""
    if not hasattr(task, "weak_demonstration"):
        raise ValueError(f"--pipeline with dpo: task {type(task).__name__} has no weaker teacher (weak_demonstration)")
    out = []
    for s in samples:
        good, weak = task.demonstration(s), task.weak_demonstration(s)
        if task.extract_answer(good) != task.extract_answer(weak):
            prompt = task.build_prompt(s)
            out.append(Pair(s.id, prompt, [{"role": "assistant", "content": good}],
                            [{"role": "assistant", "content": weak}],
                            {"chosen_model": "teacher", "rejected_model": "teacher-drops-carries",
                             "chosen_reward": task.reward(good, s), "rejected_reward": task.reward(weak, s)}))
    return out


def _greedy(cfg, run, rundir: RunDir) -> dict:
    engine = make_inference_engine(cfg, run.model, run.tokenizer)
    try:
        res = run_eval(cfg, engine, run, k=0)
    finally:
        engine.close()
    (rundir.path / "eval.json").write_text(json.dumps(res, indent=2))
    return res


def run_pipeline(cfg, run, out: Path, stages: list[str], control: bool, teacher: float, echo=print) -> dict:
    if cfg.model.lora_r > 0:
        raise ValueError("--pipeline trains the whole model in every stage; set model.lora_r=0")
    t_start = time.perf_counter()
    summary = {"task": cfg.task.name, "pipeline": ",".join(stages), "teacher_accuracy": teacher,
               "eval_problems": len(run.eval_samples), "seed": cfg.run.seed}

    t0 = time.perf_counter()
    cfg.data.sft_path = str(write_teacher_file(run, out / "sft"))  # as the plain quickstart: SFT on a data file
    sft_dir = RunDir(out / "sft")
    # a finished SFT stage in OUTPUT/sft (its last checkpoint at train.sft_steps, same config) is reused: its weights, and no step runs (the stages after it then start from the same point)
    # optimizer and RNG state are loaded and no step runs (the stages after it then start from the same point); its
    # config leaves out the dpo section, so that changing the DPO settings keeps the SFT stage reusable
    sft_cfg = dataclasses.replace(cfg, dpo=DPOConfig())
    done = sft_dir.good_checkpoint()[0]
    reuse = done is not None and load_state(done).get("step", -1) == cfg.train.sft_steps
    sft_trainer, _ = train_sft(sft_cfg, run=run, rundir=sft_dir, resume=reuse)
    summary["sft_reused"] = reuse
    summary["sft_accuracy"] = _greedy(cfg, run, sft_dir)["pass@1"]
    summary.update(sft_steps=cfg.train.sft_steps, sft_seconds=time.perf_counter() - t0)
    echo(f"  SFT: {cfg.train.sft_steps} steps, {summary['sft_seconds']:.0f}s, greedy accuracy {summary['sft_accuracy']:.3f}")
    sft_state = copy.deepcopy(run.model.state_dict()) if control else None
    sft_opt = copy.deepcopy(sft_trainer.state_dict()) if control else None
    after = time.perf_counter()  # the control gets the wall time of every stage from here

    if "dpo" in stages:
        t1 = time.perf_counter()
        pairs = delta_pairs(run.task, run.train_samples)
        dpo_dir = RunDir(out / "dpo")
        _, steps = train_dpo(cfg, run=run, rundir=dpo_dir, pairs=pairs)
        summary["dpo_accuracy"] = _greedy(cfg, run, dpo_dir)["pass@1"]
        summary.update(dpo_pairs=min(len(pairs), cfg.dpo.max_pairs or len(pairs)), dpo_steps=steps,
                       dpo_seconds=time.perf_counter() - t1)
        echo(f"  DPO: {steps} steps on {summary['dpo_pairs']} delta pairs, {summary['dpo_seconds']:.0f}s, "
             f"greedy accuracy {summary['dpo_accuracy']:.3f}")

    if "rl" in stages:
        t2 = time.perf_counter()
        rl_eval = train_rl(cfg, run=run, rundir=RunDir(out / "rl"))
        summary.update(rl_accuracy=rl_eval["pass@1"], rl_eval=rl_eval, steps=rl_eval["steps"],
                       rl_seconds=time.perf_counter() - t2)
        echo(f"  RL: {rl_eval['steps']} steps, {summary['rl_seconds']:.0f}s, greedy accuracy {rl_eval['pass@1']:.3f}")
    budget = time.perf_counter() - after

    if control:
        t3 = time.perf_counter()
        run.model.load_state_dict(sft_state)
        sft_trainer.load_state_dict(sft_opt)
        more_dir = RunDir(out / "sft_more")
        _, more = train_sft(sft_cfg, run=run, rundir=more_dir, time_budget=budget, trainer=sft_trainer,
                            start_step=cfg.train.sft_steps)
        summary.update(sft_more_accuracy=_greedy(cfg, run, more_dir)["pass@1"], sft_more_steps=more,
                       sft_more_seconds=time.perf_counter() - t3)
        echo(f"  SFT-more (control): {more} extra steps in {budget:.0f}s, greedy accuracy {summary['sft_more_accuracy']:.3f}")

    summary["wall_seconds"] = time.perf_counter() - t_start
    report = write_outputs(out, summary, ("sft", "dpo", "rl", "sft_more"))
    echo("")
    echo(format_table(summary))
    echo(f"\nsummary: {out / 'summary.json'}   report: {report}")
    return summary


def write_outputs(out: Path, summary: dict, phases: tuple[str, ...]) -> Path:
    """OUT/summary.json, and OUT/report.html over the phases' run directories that wrote metrics."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return write_report([out / n for n in phases if (out / n / "metrics.jsonl").exists()], out / "report.html")


def accuracy_table(rows: list[tuple[str, float, float | None]], s: dict) -> str:
    """(name, accuracy, minutes or None) rows as the quickstart prints them, with the summary's footer."""
    lines = [f"{'model':<26} {'accuracy':>9} {'minutes':>8}", "-" * 45]
    for name, acc, mins in rows:
        lines.append(f"{name:<26} {acc:>9.3f} {'' if mins is None else f'{mins:.1f}':>8}")
    lines.append(f"(greedy pass@1 on {s['eval_problems']} held-out problems; total {s['wall_seconds'] / 60:.1f} min)")
    return "\n".join(lines)


def format_table(s: dict) -> str:
    rows = [("teacher (demonstrations)", s["teacher_accuracy"], None),
            ("SFT on the teacher", s["sft_accuracy"], s["sft_seconds"] / 60)]
    if "dpo_accuracy" in s:
        rows.append(("SFT -> DPO (delta pairs)", s["dpo_accuracy"], s["dpo_seconds"] / 60))
    if "rl_accuracy" in s:
        rows.append(("... -> RL (GRPO)", s["rl_accuracy"], s["rl_seconds"] / 60))
    if "sft_more_accuracy" in s:
        rows.append(("SFT, more (control)", s["sft_more_accuracy"], s["sft_more_seconds"] / 60))
    return accuracy_table(rows, s)
