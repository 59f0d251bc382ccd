"""Offline difficulty filter by pass rate (Light-R1): keep the prompts a model solves sometimes, not always.

    thinkrl filter --model M --task T --data D --k 8 --keep 0.2:0.625 --out kept.jsonl [--config C] [key=value ...]

For every prompt the task's workflow runs `k` episodes against the inference engine (the episodes training
runs: a tool task uses its tools); the pass rate is the fraction whose reward is >= the pass threshold
(``algo.correct_threshold``). Prompts with ``LO <= pass rate <= HI``
(both ends included) are written to `--out` as JSONL: the input row's fields plus ``pass_rate``
(generated data: ``id``, ``prompt``, ``answer``, ``meta``). A histogram of the number of correct answers
per prompt is printed and saved next to the output (``kept.hist.json``).

- `--model`: a checkpoint / Hugging Face model directory, ``micro`` (a fresh micro model, for trying the
  mechanics), or a registered name such as ``smollm2-135m``.
- `--data`: a data file (.jsonl/.json/.parquet, fields mapped by ``data.prompt_field`` etc.) or
  ``generated:N`` (N problems from the task's generator, seed ``run.seed``).
- Sampling uses ``rollout.max_new_tokens``, ``rollout.temperature``, ``rollout.top_p/top_k`` and
  ``rollout.engine`` from the config, overridable with ``--max-new-tokens`` / ``--temperature``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from thinkrl.rollout.workflow import run_batched

HELP = "offline difficulty filter by pass rate (Light-R1)"


def parse_keep(text: str) -> tuple[float, float]:
    """``"0.2:0.625"`` -> (0.2, 0.625). Raises ValueError unless 0 <= LO <= HI <= 1."""
    parts = str(text).split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        lo, hi = float(parts[0]), float(parts[1])
    except ValueError:
        raise ValueError(f"--keep: expected LO:HI (e.g. 0.2:0.625), got {text!r}") from None
    if not (0.0 <= lo <= hi <= 1.0):
        raise ValueError(f"--keep: need 0 <= LO <= HI <= 1, got {text!r}")
    return lo, hi


def in_range(correct: int, k: int, lo: float, hi: float) -> bool:
    rate = correct / k
    return lo - 1e-9 <= rate <= hi + 1e-9


def histogram(correct: list[int], k: int) -> list[int]:
    """counts[c] = number of prompts with exactly c correct answers out of k (c = 0..k)."""
    counts = [0] * (k + 1)
    for c in correct:
        if not 0 <= c <= k:
            raise ValueError(f"correct count {c} outside 0..{k}")
        counts[c] += 1
    return counts


def format_histogram(counts: list[int], lo: float, hi: float, width: int = 40) -> str:
    k, total = len(counts) - 1, sum(counts)
    kept = sum(n for c, n in enumerate(counts) if in_range(c, k, lo, hi))
    top = max(counts) or 1
    lines = [f"pass-rate histogram: k={k}, {total} prompts, {kept} kept ({lo:g} <= pass rate <= {hi:g})",
             "  correct  pass_rate  prompts  kept"]
    for c, n in enumerate(counts):
        mark = "yes" if in_range(c, k, lo, hi) else ""
        bar = "#" * round(width * n / top)
        lines.append(f"  {c:>3}/{k:<3}  {c / k:>9.3f}  {n:>7}  {mark:<4} {bar}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- model and data


def load_model(spec: str, cfg, device):
    """(model, tokenizer) for a directory, ``micro`` or a registered model name."""
    from thinkrl.models import loading

    try:  # named models register on import
        import thinkrl.models.smollm2  # noqa: F401
    except ImportError:
        pass
    if Path(spec).is_dir():
        return loading.load_checkpoint(spec, device=device, dtype=cfg.model.dtype)
    if spec == "micro" or spec in loading.NAMED_MODELS:
        mcfg = dataclasses.replace(cfg.model, path=spec)
        return loading.load_policy(mcfg, device=device, seed=cfg.run.seed)
    known = ", ".join(["micro", *sorted(loading.NAMED_MODELS)])
    raise ValueError(f"--model {spec!r}: not a directory and not a known model name (known: {known})")


def load_data(spec: str, task, cfg) -> tuple[list, list[dict]]:
    """(samples, output rows without pass_rate) for a data file or ``generated:N``."""
    if spec.startswith("generated:"):
        n_text = spec.split(":", 1)[1]
        if not n_text.isdigit() or int(n_text) < 1:
            raise ValueError(f"--data {spec!r}: expected generated:N with N a positive integer")
        if not task.can_generate:
            raise ValueError(f"--data {spec!r}: task {task.name!r} has no generator; give a data file")
        samples = task.generate(int(n_text), seed=cfg.run.seed)
        rows = [{"id": s.id, "prompt": s.prompt, "answer": s.answer, "meta": s.meta} for s in samples]
        return samples, rows
    from thinkrl.data.datasets import load_samples

    d = cfg.data
    samples = load_samples(spec, prompt_field=d.prompt_field, answer_field=d.answer_field, id_field=d.id_field)
    return samples, [dict(s.meta["row"]) for s in samples]


# ----------------------------------------------------------------------------- sampling


def count_correct(engine, workflow, samples, k: int, params, threshold: float, batch_size: int = 64,
                  progress=None) -> list[int]:
    """Number of correct answers (raw reward >= `threshold`) out of `k` episodes of the task's `workflow`
    sampled with `params`, per prompt; `batch_size` prompts at a time."""
    sampled = workflow.with_sampling(params, k)
    return [sum(t.reward >= threshold for t in trajs)
            for trajs in run_batched(engine, sampled, samples, batch_size, progress)]


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="thinkrl filter", description=HELP)
    p.add_argument("--model", "-m", required=True, help="checkpoint / HF model directory, 'micro', or a model name")
    p.add_argument("--task", "-t", help="task name (default: task.name of --config)")
    p.add_argument("--data", "-d", required=True, help="data file, or generated:N")
    p.add_argument("--k", type=int, default=8, help="samples per prompt (default 8)")
    p.add_argument("--keep", required=True, help="pass-rate range to keep, LO:HI, both included (e.g. 0.2:0.625)")
    p.add_argument("--out", "-o", required=True, help="output JSONL of kept rows")
    p.add_argument("--config", "-c", help="YAML config (task params, data fields, rollout settings)")
    p.add_argument("--max-new-tokens", type=int, help="default: rollout.max_new_tokens")
    p.add_argument("--temperature", type=float, help="default: rollout.temperature")
    p.add_argument("--batch-size", type=int, default=64, help="prompts in flight at a time (default 64)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. task.params.max_digits=2")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    lo, hi = parse_keep(a.keep)
    if a.k < 1:
        raise ValueError(f"--k: must be >= 1, got {a.k}")
    if a.batch_size < 1:
        raise ValueError(f"--batch-size: must be >= 1, got {a.batch_size}")
    if a.max_new_tokens is not None and a.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens: must be >= 1, got {a.max_new_tokens}")
    if a.temperature is not None and a.temperature < 0:
        raise ValueError(f"--temperature: must be >= 0, got {a.temperature}")
    if not a.task and not a.config:
        raise ValueError("--task: required (or give --config with task.name)")
    from thinkrl.config import load_config

    cfg = load_config(a.config, a.overrides + ([f"task.name={a.task}"] if a.task else []))
    data_path = None if a.data.startswith("generated:") else Path(a.data)
    if data_path is not None and not data_path.exists():
        raise ValueError(f"--data: file not found: {data_path}")
    out = Path(a.out)
    if out.exists() and out.is_dir():
        raise ValueError(f"--out {out}: is a directory; give a file path")

    from thinkrl.device import resolve_device, set_threads
    from thinkrl.system.setup import Run, make_inference_engine, make_workflow, seed_everything
    from thinkrl.tasks import make_task
    from thinkrl.types import SamplingParams

    seed_everything(cfg.run.seed)
    set_threads(cfg.run.threads)
    task = make_task(cfg.task.name, cfg.task.params, cfg.task.system_prompt)
    samples, rows = load_data(a.data, task, cfg)
    device = resolve_device(cfg.run.device)
    model, tok = load_model(a.model, cfg, device)
    model.eval()
    r = cfg.rollout
    params = SamplingParams(max_new_tokens=a.max_new_tokens or r.max_new_tokens,
                            temperature=r.temperature if a.temperature is None else a.temperature,
                            top_p=r.top_p, top_k=r.top_k, stop_token_ids=[tok.eos_token_id], seed=cfg.run.seed)
    engine = make_inference_engine(cfg, model, tok)
    workflow = make_workflow(cfg, Run(cfg, device, model, tok, task, samples, []))  # the episodes training runs

    def progress(done: int, total: int) -> None:
        if not a.quiet:
            print(f"\rfilter: {done}/{total} prompts", end="" if done < total else "\n", file=sys.stderr, flush=True)

    try:
        correct = count_correct(engine, workflow, samples, a.k, params, cfg.algo.correct_threshold,
                                a.batch_size, progress)
    finally:
        engine.close()
        workflow.close()  # its reward workers
    counts = histogram(correct, a.k)
    kept = [dict(row, pass_rate=c / a.k) for row, c in zip(rows, correct) if in_range(c, a.k, lo, hi)]
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for row in kept:
            f.write(json.dumps(row, default=str) + "\n")
    hist_path = hist_path_for(out)
    hist = {
        "k": a.k, "keep": [lo, hi], "n_prompts": len(samples), "n_kept": len(kept),
        "mean_pass_rate": sum(correct) / (a.k * max(len(correct), 1)), "counts": counts,
        "bins": [{"correct": c, "pass_rate": c / a.k, "count": n, "kept": in_range(c, a.k, lo, hi)}
                 for c, n in enumerate(counts)],
        "model": a.model, "task": cfg.task.name, "data": a.data, "out": str(out),
    }
    hist_path.write_text(json.dumps(hist, indent=2))
    print(format_histogram(counts, lo, hi))
    print(f"wrote {len(kept)} rows to {out} (histogram: {hist_path})")
    return 0


def hist_path_for(out: Path) -> Path:
    """``kept.jsonl`` -> ``kept.hist.json``."""
    return out.with_name(out.stem + ".hist.json")


if __name__ == "__main__":
    from thinkrl.cli import main as cli_main

    sys.exit(cli_main(["filter", *sys.argv[1:]]))
