"""Evaluation: greedy pass@1, and with k samples per problem pass@j (unbiased), maj@k and avg@k, response lengths,
truncation, tokens per problem and a cost estimate, on a held-out set.

Every answer is one episode of the task's workflow (the one training runs: a tool task is evaluated with
its tools), and an answer is correct when its raw reward >= `correct_threshold` (``algo.correct_threshold``).
maj@k votes over the answers `extract_answer` finds in the responses (the task's ``Task.extract_answer``: the
last ``\\boxed{}`` for math, arithmetic, calculator; the response text with its whitespace normalised for a task
that does not override it). The figures are `thinkrl.eval.metrics.summarize` of the per-problem results:

    result = evaluate_problems(engine, workflow, samples, 64, correct_threshold=1.0, k=4)
    result.figures["pass@4"], [row.to_row() for row in result.problems]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from tqdm.auto import tqdm

from thinkrl.eval.metrics import ProblemResult, summarize
from thinkrl.rollout.workflow import run_batched
from thinkrl.types import Sample, SamplingParams, Trajectory

EVAL_SEED = 1234  # the sampled evaluation's seed: the same draws at every evaluation, comparable across runs


@dataclass
class EvalResult:
    figures: dict  # the flat keys of `summarize`
    problems: list[ProblemResult]  # in sample order


def _normalised(text: str) -> str:
    return " ".join(text.split())


def _generated(t: Trajectory | None) -> int:
    return t.num_response_tokens if t is not None else 0


def evaluate_problems(engine, workflow, samples: list[Sample], max_new_tokens: int, *, correct_threshold: float,
                      k: int = 0, temperature: float = 1.0, batch_size: int = 256, price_per_mtok: float = 0.0,
                      extract_answer: Callable[[str], str | None] | None = None,
                      progress: bool = False) -> EvalResult:
    """Greedy (n=1) and, with k > 0, k seeded samples (`temperature`, seed `EVAL_SEED`) per problem through copies
    of `workflow` (`system.setup.make_workflow`). At most `batch_size` answers are generated at a time. An
    episode the workflow drops counts as wrong, reward 0, no tokens. `extract_answer` (default: the response
    text, whitespace normalised) gives the answers maj@k votes over; `progress` shows a bar over problems."""
    extract = extract_answer or _normalised
    stops = list(workflow.params.stop_token_ids)
    bar = tqdm(total=len(samples) * (2 if k > 0 else 1), desc="eval", unit="problem", disable=not progress,
               dynamic_ncols=True, leave=False)
    done = [0]

    def tick(n_done: int, _total: int) -> None:
        bar.update(n_done - done[0])
        done[0] = n_done

    greedy = workflow.with_sampling(SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0,
                                                   stop_token_ids=stops), 1)
    greedy_trajs = [trajs[0] if trajs else None for trajs in run_batched(engine, greedy, samples, batch_size, tick)]
    sampled_trajs: list[list[Trajectory]] = [[] for _ in samples]
    if k > 0:
        done[0] = 0
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, stop_token_ids=stops,
                                seed=EVAL_SEED)
        sampled = workflow.with_sampling(params, k)
        sampled_trajs = run_batched(engine, sampled, samples, max(1, batch_size // k), tick)
    bar.close()
    problems = []
    for s, g, trajs in zip(samples, greedy_trajs, sampled_trajs):
        trajs = list(trajs) + [None] * (k - len(trajs))  # dropped episodes: wrong, no answer
        every = [g, *trajs]
        problems.append(ProblemResult(
            id=s.id,
            greedy_correct=g is not None and g.reward >= correct_threshold,
            greedy_reward=g.reward if g is not None else 0.0,
            greedy_answer=extract(g.metrics["text"]) if g is not None else None,
            correct=[t is not None and t.reward >= correct_threshold for t in trajs],
            answers=[extract(t.metrics["text"]) if t is not None else None for t in trajs],
            lengths=[_generated(t) for t in every],
            truncated=[t is not None and t.finish == "length" for t in every],
        ))
    return EvalResult(summarize(problems, k, price_per_mtok), problems)


def evaluate(engine, workflow, samples: list[Sample], max_new_tokens: int, *, correct_threshold: float,
             k: int = 0, **kw) -> dict:
    """The figures of `evaluate_problems` (keys: `thinkrl.eval.metrics.summarize`)."""
    return evaluate_problems(engine, workflow, samples, max_new_tokens, correct_threshold=correct_threshold,
                             k=k, **kw).figures
