"""`thinkrl eval`: the evaluation figures of one or more models / checkpoints, a table, and eval.json files.

    results = eval_models(cfg, ["runs/x/checkpoints"], output="runs/x/eval")   # every checkpoint, in step order
    print(format_table(results))

A model is a Hugging Face model directory or a checkpoint (`checkpoints/step_N`), a registered model name
("micro": a fresh micro model from cfg.model), a run's `checkpoints/` directory (every checkpoint in it, oldest
step first), or a run directory (its `checkpoints/`). The problems are `data.eval_path` (read as `data.format`)
when it is set, else the held-out split `thinkrl train` evaluates on. With `output`, one model writes
`output/eval.json` and `output/per_problem.jsonl`; several write `output/<name>/...` each.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from thinkrl.data import load_task_data
from thinkrl.data.formats import load_formatted
from thinkrl.device import resolve_device, set_threads
from thinkrl.eval.evaluate import evaluate_problems
from thinkrl.models.loading import NAMED_MODELS, load_checkpoint, load_policy
from thinkrl.system.checkpoint import checkpoint_step, list_checkpoints
from thinkrl.system.setup import Run, make_inference_engine, make_workflow, seed_everything
from thinkrl.tasks import make_task


@dataclasses.dataclass
class Model:
    name: str  # a directory name, unique among the models of one call
    path: str
    step: int | None  # the checkpoint's step, when known


def resolve_models(specs: list[str]) -> list[Model]:
    """The models `specs` name (see the module docstring). Raises FileNotFoundError naming a missing path."""
    out: list[Model] = []
    for spec in specs:
        if spec == "micro" or spec in NAMED_MODELS:
            out.append(Model(spec, spec, None))
            continue
        p = Path(spec)
        if not p.exists():
            raise FileNotFoundError(f"--model {spec}: no such model directory or checkpoint")
        root = p / "checkpoints" if (p / "checkpoints").is_dir() and not (p / "config.json").exists() else p
        ckpts = list_checkpoints(root) if not (root / "config.json").exists() else []
        if ckpts:
            out += [Model(c.name, str(c), checkpoint_step(c)) for c in ckpts]
        elif (p / "config.json").exists():
            step = checkpoint_step(p) if p.name.startswith("step_") and p.name[5:].isdigit() else None
            out.append(Model(p.name, str(p), step))
        else:
            raise FileNotFoundError(f"--model {spec}: neither a model directory (config.json) nor a checkpoints/ "
                                    "directory with step_* checkpoints")
    names = [m.name for m in out]
    for i, m in enumerate(out):  # two models with one name (e.g. two runs' step_000010) get their index
        if names.count(m.name) > 1:
            m.name = f"{i}_{m.name}"
    return out


def eval_problems(cfg, task) -> list:
    """data.eval_path (as data.format, the first data.num_eval problems) if set, else the run's held-out split."""
    if cfg.data.eval_path and not cfg.data.train_path:
        return load_formatted(cfg.data.eval_path, cfg.data, limit=cfg.data.num_eval)
    return load_task_data(cfg, task)[1]


def _load(cfg, model: Model, device):
    if model.path == "micro" or model.path in NAMED_MODELS:
        return load_policy(dataclasses.replace(cfg.model, path=model.path), device=device, seed=cfg.run.seed)
    return load_checkpoint(model.path, device=device, dtype=cfg.model.dtype)


def eval_models(cfg, specs: list[str], output: str | Path | None = None) -> list[dict]:
    """The figures of every model `specs` name (each with `checkpoint`, `step` when known, `name`), evaluated
    on the same problems with the task's workflow; written under `output` when given."""
    models = resolve_models(specs)
    task = make_task(cfg.task.name, cfg.task.params, cfg.task.system_prompt)
    samples = eval_problems(cfg, task)
    set_threads(cfg.run.threads)
    device = resolve_device(cfg.run.device)
    max_tokens = cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens
    results = []
    for m in models:
        seed_everything(cfg.run.seed)
        model, tok = _load(cfg, m, device)
        run = Run(cfg, device, model, tok, task, [], samples)
        engine = make_inference_engine(cfg, model, tok)
        workflow = make_workflow(cfg, run)
        try:
            res = evaluate_problems(engine, workflow, samples, max_tokens, correct_threshold=cfg.algo.correct_threshold,
                                    k=cfg.eval.k, temperature=cfg.eval.temperature, batch_size=cfg.eval.batch_size,
                                    price_per_mtok=cfg.eval.price_per_mtok, extract_answer=task.extract_answer,
                                    progress=cfg.log.progress)
        finally:
            engine.close()
            workflow.close()
        figures = {**res.figures, "checkpoint": m.path, "name": m.name}
        if m.step is not None:
            figures["step"] = m.step
        results.append(figures)
        if output is not None:
            d = Path(output) if len(models) == 1 else Path(output) / m.name
            d.mkdir(parents=True, exist_ok=True)
            (d / "eval.json").write_text(json.dumps(figures, indent=2) + "\n")
            with (d / "per_problem.jsonl").open("w") as f:
                for row in res.problems:
                    f.write(json.dumps(row.to_row()) + "\n")
    return results


def format_table(results: list[dict]) -> str:
    """One row per model: pass@1, the sampled figures at k, mean length, truncation and tokens per problem."""
    k = results[0]["k"] if results else 0
    cols = ["pass@1"] + ([f"pass@{k}", f"maj@{k}", f"avg@{k}"] if k > 1 else ["pass@1/sampled"] if k == 1 else [])
    cols += ["len/mean", "truncated_frac", "tokens_per_problem"]
    if any(r.get("cost_usd") for r in results):
        cols.append("cost_usd")
    width = max([len("model")] + [len(r["name"]) for r in results])
    lines = [f"{'model':<{width}} " + " ".join(f"{c:>14}" for c in cols), "-" * (width + 15 * len(cols))]
    for r in results:
        cells = [f"{r[c]:>14.4g}" if c == "cost_usd" else f"{r[c]:>14.4f}" if isinstance(r.get(c), float)
                 else f"{r.get(c, ''):>14}" for c in cols]
        lines.append(f"{r['name']:<{width}} " + " ".join(cells))
    lines.append(f"({results[0]['num_problems'] if results else 0} problems; k={k})")
    return "\n".join(lines)
