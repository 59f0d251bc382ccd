"""`thinkrl quickstart`: the whole loop on a laptop CPU, with an honest control.

micro model -> SFT on an imperfect teacher's demonstrations (written to sft/teacher.jsonl, data.sft_path) -> eval
-> RL (GRPO) -> eval
[--control: from the same SFT checkpoint, more SFT for the RL phase's wall time -> eval]
-> report.html over the phases' run dirs (sft/, rl/, sft_more/; each with its eval.json)
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from thinkrl.config import load_config
from thinkrl.pipeline import accuracy_table, parse_stages, run_pipeline, write_outputs
from thinkrl.system.rundir import RunDir
from thinkrl.system.setup import build_run, make_inference_engine
from thinkrl.system.train import run_eval, train_rl, train_sft, write_teacher_file

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "quickstart.yaml"


def quickstart(output: str = "runs/quickstart", control: bool = False, overrides: list[str] | None = None,
               config: str | None = None, echo=print, pipeline: str | None = None) -> dict:
    """`pipeline` ("sft,dpo,rl", see thinkrl/pipeline.py) runs those stages instead of SFT -> RL."""
    stages = parse_stages(pipeline) if pipeline else None  # a bad --pipeline stops before any work
    cfg = load_config(config or DEFAULT_CONFIG, list(overrides or []))
    out = Path(output)
    cfg.run.output_dir = str(out)
    if control and cfg.model.lora_r > 0:  # refused before any work: the control continues the SFT trainer itself
        raise ValueError("quickstart --control: the control continues the SFT run's full-weight trainer; set model.lora_r=0")
    t_start = time.perf_counter()
    run = build_run(cfg)
    teacher = run.task.teacher_accuracy(run.eval_samples) if hasattr(run.task, "teacher_accuracy") else float("nan")
    echo(f"thinkrl quickstart: task={cfg.task.name} model={cfg.model.path} "
         f"({sum(p.numel() for p in run.model.parameters()) / 1e6:.2f}M params) device={run.device} -> {out}")
    echo(f"  teacher accuracy on {len(run.eval_samples)} held-out problems: {teacher:.3f}")
    if stages:
        return run_pipeline(cfg, run, out, stages, control, teacher, echo)

    # 1. SFT on the teacher's demonstrations: written as a chat-format file, trained on as `thinkrl sft` trains on one
    t0 = time.perf_counter()
    cfg.data.sft_path = str(write_teacher_file(run, out / "sft"))
    sft_dir = RunDir(out / "sft")
    sft_trainer, _ = train_sft(cfg, run=run, rundir=sft_dir)  # ends with a checkpoint in sft/checkpoints
    engine = make_inference_engine(cfg, run.model, run.tokenizer)
    sft_eval = run_eval(cfg, engine, run, k=0)
    engine.close()
    (sft_dir.path / "eval.json").write_text(json.dumps(sft_eval, indent=2))
    sft_seconds = time.perf_counter() - t0
    echo(f"  SFT: {cfg.train.sft_steps} steps, {sft_seconds:.0f}s, greedy accuracy {sft_eval['pass@1']:.3f}")
    sft_state = copy.deepcopy(run.model.state_dict()) if control else None
    sft_opt = copy.deepcopy(sft_trainer.state_dict()) if control else None

    # 2. RL from the SFT model
    t1 = time.perf_counter()
    rl_eval = train_rl(cfg, run=run, rundir=RunDir(out / "rl"))
    rl_seconds = time.perf_counter() - t1
    echo(f"  RL: {rl_eval['steps']} steps, {rl_seconds:.0f}s, greedy accuracy {rl_eval['pass@1']:.3f}")
    wall = time.perf_counter() - t_start

    summary = {
        "task": cfg.task.name,
        "teacher_accuracy": teacher,
        "sft_accuracy": sft_eval["pass@1"],
        "rl_accuracy": rl_eval["pass@1"],
        "rl_eval": rl_eval,
        "eval_problems": len(run.eval_samples),
        "sft_steps": cfg.train.sft_steps,
        "steps": rl_eval["steps"],
        "sft_seconds": sft_seconds,
        "rl_seconds": rl_seconds,
        "wall_seconds": wall,
        "seed": cfg.run.seed,
    }

    # 3. the matched-compute control: more SFT from the same checkpoint for the RL phase's wall time
    if control:
        t2 = time.perf_counter()
        run.model.load_state_dict(sft_state)
        sft_trainer.load_state_dict(sft_opt)
        _, more = train_sft(cfg, run=run, rundir=RunDir(out / "sft_more"), time_budget=rl_seconds,
                            trainer=sft_trainer, start_step=cfg.train.sft_steps)
        engine = make_inference_engine(cfg, run.model, run.tokenizer)
        more_eval = run_eval(cfg, engine, run, k=0)
        engine.close()
        (out / "sft_more" / "eval.json").write_text(json.dumps(more_eval, indent=2))
        summary.update(sft_more_accuracy=more_eval["pass@1"], sft_more_steps=more,
                       sft_more_seconds=time.perf_counter() - t2)
        echo(f"  SFT-more (control): {more} extra steps in {rl_seconds:.0f}s, greedy accuracy {more_eval['pass@1']:.3f}")

    report = write_outputs(out, summary, ("sft", "rl", "sft_more"))
    echo("")
    echo(format_table(summary))
    echo(f"\nsummary: {out / 'summary.json'}   RL metrics: {out / 'rl' / 'metrics.jsonl'}   report: {report}")
    return summary


def format_table(s: dict) -> str:
    rows = [("teacher (demonstrations)", s["teacher_accuracy"], None),
            ("SFT on the teacher", s["sft_accuracy"], s["sft_seconds"] / 60)]
    if "sft_more_accuracy" in s:
        rows.append(("SFT, more (control)", s["sft_more_accuracy"], s["sft_more_seconds"] / 60))
    rows.append(("SFT -> RL (GRPO)", s["rl_accuracy"], s["rl_seconds"] / 60))
    return accuracy_table(rows, s)
