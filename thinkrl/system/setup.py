"""Building the pieces of a run from a Config: model, tokenizer, task, data, engines, workflow."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from thinkrl.data import load_task_data
from thinkrl.device import check_dtype, deterministic_kernels, resolve_device, set_threads
from thinkrl.models.loading import NAMED_MODELS, load_checkpoint, load_policy
from thinkrl.rollout.base import engine_class
from thinkrl.rollout.workflow import SingleTurnWorkflow
from thinkrl.tasks import make_task
from thinkrl.tasks.isolation import make_scorer
from thinkrl.types import SamplingParams


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_inference_engine(cfg, model, tokenizer, version: int = 0):
    """The rollout engine registered as cfg.rollout.engine (thinkrl.rollout.base.engine_names())."""
    return engine_class(cfg.rollout.engine).from_config(cfg, model, tokenizer, version)


def sampling_params(cfg, tokenizer) -> SamplingParams:
    r = cfg.rollout
    return SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                          stop_token_ids=[tokenizer.eos_token_id])


@dataclass
class Run:
    cfg: object
    device: torch.device
    model: object
    tokenizer: object
    task: object
    train_samples: list
    eval_samples: list


def build_run(cfg, model_dir: str | None = None) -> Run:
    seed_everything(cfg.run.seed)
    set_threads(cfg.run.threads)
    device = resolve_device(cfg.run.device)
    check_dtype(device, cfg.model.dtype)
    if cfg.model.autocast_bf16:
        check_dtype(device, torch.bfloat16, "model.autocast_bf16")
    if cfg.run.deterministic:
        deterministic_kernels(device)
    task = make_task(cfg.task.name, cfg.task.params, cfg.task.system_prompt)
    src = model_dir or cfg.run.init_from
    if src and (src == "micro" or src in NAMED_MODELS):  # a model name, not a directory
        import dataclasses

        model, tok = load_policy(dataclasses.replace(cfg.model, path=src), device=device, seed=cfg.run.seed)
    elif src:
        model, tok = load_checkpoint(src, device=device, dtype=cfg.model.dtype)
    else:
        model, tok = load_policy(cfg.model, device=device, seed=cfg.run.seed)
    train, ev = load_task_data(cfg, task)
    return Run(cfg, device, model, tok, task, train, ev)


def make_workflow(cfg, run: Run, scorer=None):
    """Tool-using tasks (with `task.tools`) get the multi-turn workflow, the rest single-turn episodes. Rewards go
    through `scorer`, by default the one cfg.task names (isolation, timeout, workers); `workflow.close()` stops it."""
    params = sampling_params(cfg, run.tokenizer)
    if scorer is None:
        scorer = make_scorer(run.task, cfg.task)
    if getattr(run.task, "tools", None):
        from thinkrl.rollout.multiturn import ToolWorkflow

        return ToolWorkflow(run.task, run.tokenizer, params, cfg.rollout.n, scorer=scorer,
                            tool_timeout=cfg.task.tool_timeout)
    return SingleTurnWorkflow(run.task, run.tokenizer, params, cfg.rollout.n, scorer=scorer)


def output_dir(cfg, override: str | None = None) -> Path:
    return Path(override or cfg.run.output_dir)
