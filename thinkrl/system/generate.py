"""`thinkrl generate` (distillation data from any model, rejection-sampled by the task's verifier) and
`thinkrl pairs` (delta-learning preference pairs from a stronger and a weaker model).

    summary = generate(cfg, "runs/teacher/checkpoints/step_000100", "gen.jsonl", samples=4)   # keep: correct
    counts = make_pair_file(cfg, "pairs.jsonl", chosen="strong.jsonl", rejected="weak.jsonl", verified=True)

`generate` samples `samples` answers per prompt with the rollout engine the config names (embedded, hf, or remote
SGLang/vLLM servers), each answer one episode of the task's workflow (a tool task uses its tools; the answer is
the episode's whole response text), scored by the task's reward when it has one; a prompt's answers are seeded by
(run.seed, prompt id). The kept answers (``keep``: ``correct``, reward >= algo.correct_threshold, the
default with a verifier; or ``all``) are appended to the output as chat-format JSONL rows (thinkrl.data.files:
``id``, ``sample``, ``messages``, ``reward``, ``model``), flushed after every batch. The ids of finished prompts go
to ``OUTPUT.done``, so a rerun skips them: a torn last line (a kill mid-write) is dropped with a warning, and rows
of a prompt not marked done are removed and that prompt generated again.

The prompts are the run's training problems (``data="train"``: data.train_path's training split or the task's
generator), its eval problems (``"eval"``), or every row of a data file (read as data.format with the field
mapping). The model is a checkpoint / Hugging Face directory, ``micro`` or a registered name; with
rollout.engine=remote the servers hold the weights and the directory gives only the tokenizer.

`make_pair_file` pairs two generation files (or first generates them, ``keep=all``, from two models into
``OUTPUT.chosen.jsonl`` / ``OUTPUT.rejected.jsonl``) with thinkrl.data.delta.make_pairs and writes the pairs.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

from tqdm.auto import tqdm

from thinkrl.data import load_task_data
from thinkrl.data.datasets import DataError
from thinkrl.data.delta import PairCounts, make_pairs
from thinkrl.data.files import read_generations, read_jsonl_rows
from thinkrl.data.formats import load_formatted
from thinkrl.device import resolve_device, set_threads
from thinkrl.models.loading import NAMED_MODELS, load_checkpoint, load_policy, load_tokenizer
from thinkrl.system.setup import Run, make_inference_engine, make_workflow, sampling_params, seed_everything
from thinkrl.tasks import make_task
from thinkrl.tasks.base import Task

log = logging.getLogger("thinkrl")

KEEP = ("correct", "all")  # the choices of generate's `keep`


def has_verifier(task) -> bool:
    """Whether the task scores answers (overrides `Task.reward`, or wraps a reward function)."""
    return type(task).reward is not Task.reward


class _Unscored:
    """The scorer of a task without a verifier: no reward is computed (the rows' reward is null)."""

    async def __call__(self, task, items: list) -> list[tuple[float, str]]:
        return [(0.0, "ok")] * len(items)

    def close(self) -> None:
        pass


def prompts_for(cfg, task, data: str) -> list:
    """The prompts `data` names: "train" | "eval" (the run's splits) | a data file (all its rows)."""
    if data in ("train", "eval"):
        train, held = load_task_data(cfg, task)
        return train if data == "train" else held
    if not Path(data).exists():
        raise DataError(f"--data {data}: no such file (or use train / eval: the run's splits)")
    return load_formatted(data, cfg.data)


def load_model(cfg, spec: str, device):
    """(model or None, tokenizer) for a directory, ``micro`` or a registered name; remote: the tokenizer only."""
    if spec == "micro" or spec in NAMED_MODELS:
        return load_policy(dataclasses.replace(cfg.model, path=spec), device=device, seed=cfg.run.seed)
    if not Path(spec).is_dir():
        known = ", ".join(["micro", *sorted(NAMED_MODELS)])
        raise FileNotFoundError(f"--model {spec}: not a directory and not a known model name (known: {known})")
    if cfg.rollout.engine == "remote":
        return None, load_tokenizer(spec)
    return load_checkpoint(spec, device=device, dtype=cfg.model.dtype)


def prompt_seed(seed: int, sample_id: str) -> int:
    """The sampling seed of one prompt's answers: a function of (run.seed, prompt id) only, so the answers do not
    depend on which prompts share a batch (a resumed run draws what the uninterrupted one would have)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()[:4], "big") >> 1


def _episodes(engine, workflow, chunk: list, seed: int) -> list[list]:
    """Each prompt's `workflow.n` episodes, all of the chunk's in flight at once, seeded by `prompt_seed`."""
    async def go():
        wfs = [workflow.with_sampling(dataclasses.replace(workflow.params, seed=prompt_seed(seed, s.id)), workflow.n)
               for s in chunk]
        return await asyncio.gather(*[wf.run_episode(engine, s, s.id) for wf, s in zip(wfs, chunk)])

    return [list(r or []) for r in asyncio.run(go())]


def _done_ids(path: Path) -> set[str]:
    """The ids in OUTPUT.done; a last line without its newline (cut off by a kill) does not count."""
    if not path.exists():
        return set()
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    if not text.endswith("\n"):
        with path.open("r+b") as f:
            f.truncate(len(text.encode("utf-8")) - len(lines[-1].encode("utf-8")))
    return {json.loads(x) for x in lines[:-1] if x.strip()}


def _append(path: Path, lines: list[str]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(lines))
        f.flush()
        os.fsync(f.fileno())


def _rewrite(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def generate(cfg, model: str, output: str | Path, samples: int = 1, keep: str | None = None, data: str = "train",
             batch_size: int = 16, echo=print) -> dict:
    """Write the kept answers of `samples` episodes per prompt to `output` (see the module docstring); resumable.
    Returns the counts: prompts, skipped (done before), answers, kept."""
    if samples < 1:
        raise ValueError(f"--samples: must be >= 1, got {samples}")
    if batch_size < 1:
        raise ValueError(f"--batch-size: must be >= 1, got {batch_size}")
    seed_everything(cfg.run.seed)
    set_threads(cfg.run.threads)
    task = make_task(cfg.task.name, cfg.task.params, cfg.task.system_prompt)
    verifier = has_verifier(task)
    keep = keep or ("correct" if verifier else "all")
    if keep not in KEEP:
        raise ValueError(f"--keep: unknown value {keep!r}; valid: {', '.join(KEEP)}")
    if keep == "correct" and not verifier:
        raise ValueError(f"--keep correct: task {cfg.task.name!r} has no verifier (reward); use --keep all")
    problems = prompts_for(cfg, task, data)
    out = Path(output)
    if out.is_dir():
        raise ValueError(f"--output {out}: is a directory; give a file path")
    out.parent.mkdir(parents=True, exist_ok=True)
    done_path = out.with_name(out.name + ".done")
    done = _done_ids(done_path)
    rows = read_jsonl_rows(out, repair=True)
    for where, row in rows:
        if row.get("model") != model:
            raise ValueError(f"{where}: written by model {row.get('model')!r}, not {model!r}; give another --output")
    unfinished = [r for _, r in rows if str(r.get("id")) not in done]
    if unfinished:  # a kill between the rows of a batch and its done ids: those prompts run again
        log.warning("%s: %d rows of prompts not marked done removed; they are generated again", out, len(unfinished))
        _rewrite(out, [r for _, r in rows if str(r.get("id")) in done])
    todo = [s for s in problems if s.id not in done]
    counts = {"prompts": len(problems), "skipped": len(problems) - len(todo), "answers": 0, "kept": 0}
    if not todo:
        echo(f"generate: all {len(problems)} prompts already in {out}")
        return counts
    device = resolve_device(cfg.run.device)
    policy, tok = load_model(cfg, model, device)
    if policy is not None:
        policy.eval()
    engine = make_inference_engine(cfg, policy, tok)
    run = Run(cfg, device, policy, tok, task, [], [])
    workflow = make_workflow(cfg, run, scorer=None if verifier else _Unscored()).with_sampling(
        sampling_params(cfg, tok), samples)
    bar = tqdm(total=len(problems), initial=counts["skipped"], desc="generate", unit="prompt",
               disable=not cfg.log.progress, dynamic_ncols=True)
    try:
        for i in range(0, len(todo), batch_size):
            chunk = todo[i: i + batch_size]
            lines = []
            for s, trajs in zip(chunk, _episodes(engine, workflow, chunk, cfg.run.seed)):
                prompt = task.build_prompt(s)
                for j, t in enumerate(trajs):
                    counts["answers"] += 1
                    if keep == "correct" and t.reward < cfg.algo.correct_threshold:
                        continue
                    counts["kept"] += 1
                    lines.append(json.dumps({
                        "id": s.id, "sample": j,
                        "messages": prompt + [{"role": "assistant", "content": t.metrics["text"]}],
                        "reward": float(t.reward) if verifier else None, "model": model}) + "\n")
            _append(out, lines)  # the rows first, then the ids that mark their prompts done
            _append(done_path, [json.dumps(s.id) + "\n" for s in chunk])
            bar.update(len(chunk))
    finally:
        bar.close()
        engine.close()
        workflow.close()
    echo(f"generate: {len(todo)} prompts x {samples} samples -> kept {counts['kept']} of {counts['answers']} answers "
         f"({keep}) in {out}" + (f"; {counts['skipped']} prompts were done before" if counts["skipped"] else ""))
    return counts


def make_pair_file(cfg, output: str | Path, chosen: str | None = None, rejected: str | None = None,
                   chosen_model: str | None = None, rejected_model: str | None = None, samples: int = 1,
                   verified: bool = False, data: str = "train", batch_size: int = 16, echo=print) -> PairCounts:
    """Pairs of `chosen` (the stronger) and `rejected` (the weaker) answers written to `output`; each side is a
    generation file or a model to generate one with (see the module docstring)."""
    out = Path(output)
    files = {}
    for side, path, model in (("chosen", chosen, chosen_model), ("rejected", rejected, rejected_model)):
        if (path is None) == (model is None):
            raise ValueError(f"give one of --{side} FILE or --{side}-model MODEL")
        if model is not None:
            path = str(out.with_name(f"{out.stem}.{side}.jsonl"))
            generate(cfg, model, path, samples=samples, keep="all", data=data, batch_size=batch_size, echo=echo)
        files[side] = path
    task = make_task(cfg.task.name, cfg.task.params, cfg.task.system_prompt)
    pairs, counts = make_pairs(read_generations(files["chosen"]), read_generations(files["rejected"]),
                               extract=task.extract_answer, verified=verified, threshold=cfg.algo.correct_threshold)
    if not pairs:
        raise ValueError(f"no pairs left to write ({counts.line()})")
    out.parent.mkdir(parents=True, exist_ok=True)
    _rewrite(out, pairs)
    echo(f"pairs: {counts.line()} -> {out}")
    return counts
