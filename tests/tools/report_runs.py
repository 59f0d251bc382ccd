"""Run directories with the metric names of the contract (metrics.jsonl, eval.json files), for the report tests."""
from __future__ import annotations

import json
from pathlib import Path


def rl_record(step: int, eval_every: int = 5, last: int = 0) -> dict:
    """Step `step`'s record; an evaluation every `eval_every` steps except at the last (training ends with eval.json)."""
    r = {"step": step, "time": 2.0 * step, "reward/mean": 0.1 + 0.01 * step, "acc/mean": 0.1 + 0.01 * step,
         "group/all_correct_frac": 0.01 * step, "group/all_wrong_frac": 0.5 - 0.01 * step,
         "len/response_mean": 20.0 + step, "len/response_max": 40.0, "len/truncated_frac": 0.02,
         "loss/policy": -0.01 * step, "clip/frac": 0.05, "kl/mean": 0.001 * step, "entropy/mean": 1.0 - 0.01 * step,
         "grad/norm": 0.5, "staleness/mean": 0.5, "staleness/max": 1.0,
         "mismatch/logp_abs_diff_mean": 1e-3, "mismatch/logp_abs_diff_max": 1e-2, "mismatch/k3": 1e-5,
         "mismatch/ratio_out_frac": 0.0, "mismatch/seq_ratio_max": 1.01, "mismatch/seq_ratio_min": 0.99,
         "perf/wait_seconds": 1.0, "perf/train_seconds_total": 0.8, "perf/sync_seconds": 0.2,
         "perf/tokens_per_s": 1000.0, "perf/gen_tokens_per_s": 500.0, "perf/train_tokens": 100.0,
         "groups": [step]}  # a list: not a number, never plotted
    if step % eval_every == 0 and step != last:
        acc = 0.2 + 0.02 * step
        r.update({"eval/pass@1": acc, "eval/reward/greedy": acc, "eval/num_problems": 50, "eval/k": 4,
                  "eval/pass@1/sampled": acc - 0.05, "eval/pass@2": acc + 0.05, "eval/pass@4": acc + 0.1,
                  "eval/maj@4": acc, "eval/avg@4": acc - 0.05, "eval/len/mean": 20.0, "eval/len/p50": 19.0,
                  "eval/len/p90": 30.0, "eval/len/max": 40.0, "eval/truncated_frac": 0.01,
                  "eval/tokens_per_problem": 100.0 + step, "eval/cost_per_problem_usd": 1e-4, "eval/cost_usd": 5e-3})
    return r


def final_eval(step: int, acc: float, tokens: float) -> dict:
    return {"pass@1": acc, "reward/greedy": acc, "num_problems": 50, "k": 4, "pass@1/sampled": acc - 0.05,
            "pass@2": acc + 0.05, "pass@4": acc + 0.1, "maj@4": acc, "avg@4": acc - 0.05, "len/mean": 20.0,
            "len/p50": 19.0, "len/p90": 30.0, "len/max": 40.0, "truncated_frac": 0.01,
            "tokens_per_problem": tokens, "cost_per_problem_usd": 1e-4, "cost_usd": 5e-3, "steps": step}


def make_rl_run(path: Path, steps: int = 20) -> Path:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(rl_record(s, last=steps)) + "\n" for s in range(1, steps + 1)))
    (path / "eval.json").write_text(json.dumps(final_eval(steps, 0.7, 130.0)))
    ck = path / "evals" / "step_000010"
    ck.mkdir(parents=True)
    (ck / "eval.json").write_text(json.dumps({**final_eval(10, 0.45, 90.0), "step": 10, "checkpoint": str(ck)}))
    return path


def make_sft_run(path: Path, steps: int = 30) -> Path:
    path.mkdir(parents=True)
    recs = [{"step": s, "phase": "sft", "loss/sft": 2.0 / s, "grad/norm": 1.0, "lr": 1e-3} for s in range(1, steps + 1)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (path / "eval.json").write_text(json.dumps(final_eval(steps, 0.3, 60.0)))
    return path
