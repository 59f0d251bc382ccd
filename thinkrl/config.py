"""Dataclass configs: YAML file + dotted CLI overrides (key=value), validated with clear errors.

    cfg = load_config("configs/quickstart.yaml", ["algo.lr=1e-5", "rollout.n=8"])

Every error is a `ConfigError` whose message is one line naming the key and what is wrong.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from thinkrl.algo.config import AlgoConfig


class ConfigError(ValueError):
    """A config problem; the message is one line meant for the user."""


@dataclass
class ModelConfig:
    path: str = "micro"  # "micro" (embedded default), a registered name, or a local HF model directory
    dtype: str = "float32"  # float32 | bfloat16 | float16 (weights of the trained model)
    autocast_bf16: bool = False  # bf16 autocast for forward passes where the device supports it
    # micro model architecture (used when path == "micro")
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    max_position: int = 256
    # LoRA (via peft); r == 0: full fine-tuning
    lora_r: int = 0
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    gradient_checkpointing: bool = False


@dataclass
class DataConfig:
    train_path: str = ""  # empty: samples come from the task's generator
    eval_path: str = ""  # empty: a held-out split (from the file, or the generator with another seed)
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    id_field: str = ""
    # auto (the fields above when the file's first row has prompt_field, else the standard set its fields match) |
    # gsm8k (question, answer "... #### n") | math500 (problem, answer, unique_id) | aime (problem, answer[, id])
    format: str = "auto"
    num_train: int = 20000  # generated tasks: how many training problems
    num_eval: int = 500  # held-out problems for evaluation
    eval_fraction: float = 0.1  # file datasets without eval_path: fraction held out
    shuffle: bool = True
    # thinkrl sft on a chat-format file (.jsonl | .json | .parquet | a `datasets` directory; thinkrl.data.files): rows
    # with sft_messages_field (a list of {role, content}; loss on the assistant turns) or sft_prompt_field +
    # sft_response_field strings (one user and one assistant message); empty: the task's demonstrations
    sft_path: str = ""
    sft_messages_field: str = "messages"
    sft_prompt_field: str = "prompt"
    sft_response_field: str = "response"


@dataclass
class TaskConfig:
    name: str = "arithmetic"  # registered name, or "pkg.module:Attr" import path
    params: dict = field(default_factory=dict)  # task-specific keyword arguments
    system_prompt: str = ""
    reward_timeout: float = 10.0  # seconds per reward call (0: no limit); past it the call scores 0 (reward/timeouts)
    # where rewards run (thinkrl.tasks.isolation): auto (the task's declaration: worker processes for user rewards,
    # inline for built-ins that cannot hang) | process (worker processes; a hang or crash kills and replaces the
    # worker) | thread (a thread pool; a hang in one C call is abandoned, not stopped) | inline (the rollout loop)
    reward_isolation: str = "auto"
    reward_workers: int = 2  # reward worker processes (process) or threads (thread)
    # seconds per tool call of a multi-turn task (0: no limit); past it the model gets "error: timed out" and the
    # call is counted (tools/timeouts). Synchronous tools run in daemon threads: one stuck in C code is abandoned
    tool_timeout: float = 10.0


@dataclass
class RolloutConfig:
    # embedded (in-process PyTorch engine) | hf (Hugging Face generate on the trainer's own module) | remote
    # (SGLang/vLLM servers): the names registered in thinkrl.rollout.base (engine_names())
    engine: str = "embedded"
    n: int = 8  # samples per prompt (group size)
    batch_prompts: int = 16  # prompts per RL step
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    # the staleness bound eta of the one loop: 0 is the synchronous loop (generate, train, repeat); eta > 0 lets
    # rollouts run up to eta policy versions ahead of training (async; needs algo.loss=decoupled_ppo or gspo)
    max_staleness: int = 0
    # async: eager = start every group the bound allows; adaptive = while the trainer finds its batches ready
    # (training is the bottleneck), start at most one batch ahead: same throughput, staleness ~1 instead of eta
    admission: str = "adaptive"
    placement: str = "auto"  # async: inline (engine in this process) | process (its own process) | auto
    weight_sync: str = "auto"  # async: auto | memory | shm | disk | dist | engine
    engine_threads: int = 1  # async with an engine process: its torch threads
    servers: list[str] = field(default_factory=list)  # remote engine: base URLs
    server_api: str = "sglang"  # sglang | openai
    max_concurrency: int = 64  # remote engine: sequences in flight per server
    request_timeout: float = 3600.0  # remote engine: seconds per HTTP request
    max_retries: int = 3  # remote engine: retries per request (exponential backoff)
    # what a weight load does to in-flight requests (thinkrl.rollout.base.PAUSE_MODES; each engine declares the
    # modes it supports in caps.pause_modes, and a mode the engine does not support fails at load):
    #   auto:     the engine's default: in_place for embedded and hf, abort for remote
    #   in_place: in-flight sequences stop at a token boundary, keep their KV cache and continue with the new
    #             weights; every token carries the version that produced it (embedded, hf, remote)
    #   retract:  as in_place, but their KV cache is recomputed with the new weights when they continue (remote)
    #   abort:    in-flight requests end at once with their partial output; the remote engine resumes those
    #             samples itself, so they complete (embedded, remote)
    pause_mode: str = "auto"
    weights_dir: str = ""  # remote engine: shared directory the weights are written to for /update_weights_from_disk
    server_api_key: str = ""  # remote engine: API key (or env THINKRL_SERVER_API_KEY)


@dataclass
class TrainConfig:
    steps: int = 100  # RL steps
    max_tokens_per_mb: int = 8192  # micro-batch token budget
    packing: bool = True  # padding-free 1-D packing (False: padded micro-batches)
    share_prompt: bool = True  # RL: the n responses of a prompt share one copy of its tokens
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine | linear
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    world_size: int = 1  # data-parallel ranks (gloo on CPU, NCCL on CUDA); or launch with torchrun
    parallel: str = "ddp"  # ddp | fsdp2 (with world_size > 1)
    # SFT
    sft_steps: int = 1000
    sft_lr: float = 3e-3
    sft_batch_size: int = 64
    sft_warmup_steps: int = 0
    save_every: int = 0  # RL and SFT steps between checkpoints (0: at the end only)
    keep_checkpoints: int = 2  # the newest checkpoints kept (older ones are deleted); resume falls back to them
    # NaN/Inf in the loss or the gradient norm: the optimizer step is skipped (gradients dropped, weights, optimizer
    # state and LR schedule unchanged) and counted (train/skipped_steps); this many in a row stop the run (0: never)
    max_bad_steps: int = 3


@dataclass
class EvalConfig:
    every: int = 0  # RL steps between evaluations (0: only at the end)
    sft_every: int = 0  # SFT steps between evaluations (greedy pass@1 on the eval set, eval/* in metrics; 0: none)
    k: int = 4  # samples per problem for pass@j (j <= k), maj@k, avg@k (0: greedy pass@1 only)
    temperature: float = 1.0
    max_new_tokens: int = 0  # 0: same as rollout.max_new_tokens
    batch_size: int = 256
    price_per_mtok: float = 0.0  # USD per million generated tokens, for the cost figures (0: no cost)


@dataclass
class LogConfig:
    progress: bool = True
    # where metrics go, each record under the same names: jsonl (RUN_DIR/metrics.jsonl, always written) |
    # tensorboard (RUN_DIR/tensorboard) | wandb (RUN_DIR/wandb); the names registered in thinkrl.logs
    backends: list[str] = field(default_factory=lambda: ["jsonl"])
    wandb_mode: str = "offline"  # offline (no network; `wandb sync RUN_DIR/wandb/offline-run-*` uploads) | online
    wandb_project: str = "thinkrl"
    wandb_name: str = ""  # "": the run directory's name


@dataclass
class RunConfig:
    output_dir: str = "runs/train"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    threads: int = 0  # torch intra-op threads (0: torch default)
    init_from: str = ""  # checkpoint directory to start from (e.g. an SFT run's final checkpoint)
    # a run is a pure function of its config and seed, across kill -9 and --resume: with eta > 0 batch j is
    # generated by policy version max(0, j - eta) only (no mid-sequence weight swap); kernels are not picked by timing;
    # on CUDA torch's deterministic algorithms (thinkrl.device.deterministic_kernels)
    deterministic: bool = False


@dataclass
class ClusterConfig:
    backend: str = "local"  # local | ray
    address: str = ""  # ray: cluster address ("" starts a local Ray instance; "auto" joins a running one)
    num_engines: int = 1
    engine_cpus: float = 1.0
    engine_gpus: float = 0.0
    trainer_cpus: float = 1.0
    trainer_gpus: float = 0.0
    placement: str = "PACK"  # Ray placement-group strategy: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    num_cpus: int = 0  # local Ray instance: CPUs to offer (0: the bundles' total)


@dataclass
class DPOConfig:
    """`thinkrl dpo`: preference pairs (thinkrl/data/pairs.py formats); LoRA via model.lora_r."""

    path: str = ""  # JSONL of preference pairs (TRL's conversational or standard format)
    loss: str = "sigmoid"  # sigmoid (DPO) | ipo (length-normalised, as TRL) | simpo (reference-free, mean log-prob, margin simpo_gamma)
    beta: float = 0.1
    simpo_gamma: float = 0.5  # simpo: the target reward margin
    label_smoothing: float = 0.0  # sigmoid: conservative DPO's ε in [0, 0.5)
    sft_coef: float = 0.0  # + sft_coef · NLL of the chosen completions, mean over their tokens (RPO; TRL's "sft" loss term)
    steps: int = 100
    batch_size: int = 32  # pairs per step
    lr: float = 1e-4
    warmup_steps: int = 0
    max_pairs: int = 0  # use at most this many pairs (0: all)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    run: RunConfig = field(default_factory=RunConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# ----------------------------------------------------------------------------- building


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys += _all_keys(hint, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:  # try on the last component only
        last = key.rsplit(".", 1)[-1]
        by_last = {k.rsplit(".", 1)[-1]: k for k in valid}
        m = difflib.get_close_matches(last, list(by_last), n=1, cutoff=0.6)
        close = [by_last[m[0]]] if m else []
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        errs = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except ConfigError as e:
                errs.append(str(e))
        raise ConfigError(errs[0] if errs else f"{key}: bad value {value!r}")
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):  # YAML reads "1e-5" as a string
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if origin is list or hint is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def _apply(obj: Any, data: dict, prefix: str, valid: list[str]) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(f"unknown config key '{key}'{_suggest(key, valid)}")
        hint = hints[k]
        if dataclasses.is_dataclass(hint):
            _apply(getattr(obj, k), v, f"{key}.", valid)
        else:
            setattr(obj, k, _coerce(key, v, hint))


def _set_dotted(obj: Any, key: str, raw: str, valid: list[str]) -> None:
    parts = key.split(".")
    target = obj
    for i, p in enumerate(parts):
        if not dataclasses.is_dataclass(target) or p not in {f.name for f in dataclasses.fields(target)}:
            # task.params.foo=1 : free-form task parameters
            if isinstance(target, dict):
                target[".".join(parts[i:])] = yaml.safe_load(raw) if raw != "" else ""
                return
            raise ConfigError(f"unknown config key '{key}'{_suggest(key, valid)}")
        if i == len(parts) - 1:
            hint = typing.get_type_hints(type(target))[p]
            if dataclasses.is_dataclass(hint):
                raise ConfigError(f"{key}: is a section; set one of its keys, e.g. {key}.{dataclasses.fields(hint)[0].name}=...")
            try:
                value = yaml.safe_load(raw) if raw != "" else ""
            except yaml.YAMLError:
                value = raw
            setattr(target, p, _coerce(key, value, hint))
            return
        target = getattr(target, p)


def validate(cfg: Config) -> Config:
    """Impossible values and unknown registry names. Raises ConfigError."""

    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{key}: {msg}, got {_get(cfg, key)!r}")

    def one_of(key: str, options: list[str]) -> None:
        if _get(cfg, key) not in options:
            raise ConfigError(f"{key}: unknown value {_get(cfg, key)!r}; valid: {', '.join(sorted(options))}")

    need(cfg.rollout.n >= 1, "rollout.n", "must be >= 1")
    need(cfg.rollout.batch_prompts >= 1, "rollout.batch_prompts", "must be >= 1")
    need(cfg.rollout.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
    need(cfg.rollout.temperature >= 0, "rollout.temperature", "must be >= 0")
    need(0 < cfg.rollout.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
    need(cfg.rollout.top_k >= 0, "rollout.top_k", "must be >= 0")
    need(cfg.rollout.max_staleness >= 0, "rollout.max_staleness", "must be >= 0")
    from thinkrl.rollout.wire import APIS  # the remote engine's wire formats

    one_of("rollout.server_api", list(APIS))
    from thinkrl.rollout.base import engine_names, pause_mode_choices  # the engine registry

    one_of("rollout.engine", engine_names())
    modes = pause_mode_choices(cfg.rollout.engine)
    need(cfg.rollout.pause_mode in modes, "rollout.pause_mode",
         f"rollout.engine={cfg.rollout.engine} supports {', '.join(modes)}")
    one_of("rollout.placement", ["auto", "inline", "process"])
    one_of("rollout.admission", ["adaptive", "eager"])
    one_of("rollout.weight_sync", ["auto", "memory", "shm", "disk", "dist", "engine"])
    need(cfg.rollout.engine_threads >= 1, "rollout.engine_threads", "must be >= 1")
    one_of("cluster.backend", ["local", "ray"])
    one_of("cluster.placement", ["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"])
    need(cfg.cluster.num_engines >= 1, "cluster.num_engines", "must be >= 1")
    need(cfg.rollout.engine != "remote" or bool(cfg.rollout.servers), "rollout.servers", "must list at least one server URL with rollout.engine=remote")
    need(cfg.algo.lr > 0, "algo.lr", "must be > 0")
    need(cfg.algo.clip_low >= 0, "algo.clip_low", "must be >= 0")
    need(cfg.algo.clip_high >= 0, "algo.clip_high", "must be >= 0")
    need(cfg.algo.dual_clip == 0 or cfg.algo.dual_clip > 1, "algo.dual_clip", "must be 0 (off) or > 1")
    need(cfg.algo.ppo_epochs >= 1, "algo.ppo_epochs", "must be >= 1")
    need(cfg.algo.kl_coef >= 0, "algo.kl_coef", "must be >= 0")
    need(cfg.train.steps >= 0, "train.steps", "must be >= 0")
    need(cfg.train.max_tokens_per_mb >= 16, "train.max_tokens_per_mb", "must be >= 16")
    need(cfg.train.world_size >= 1, "train.world_size", "must be >= 1")
    need(cfg.train.sft_steps >= 0, "train.sft_steps", "must be >= 0")
    need(cfg.train.sft_lr > 0, "train.sft_lr", "must be > 0")
    need(cfg.train.sft_batch_size >= 1, "train.sft_batch_size", "must be >= 1")
    need(cfg.train.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
    need(cfg.train.max_bad_steps >= 0, "train.max_bad_steps", "must be >= 0 (0: never stop)")
    need(cfg.task.reward_timeout >= 0, "task.reward_timeout", "must be >= 0 (0: no limit)")
    need(cfg.task.tool_timeout >= 0, "task.tool_timeout", "must be >= 0 (0: no limit)")
    from thinkrl.tasks.isolation import ISOLATION

    one_of("task.reward_isolation", list(ISOLATION))
    need(cfg.task.reward_workers >= 1, "task.reward_workers", "must be >= 1")
    need(len(cfg.train.betas) == 2 and all(0 <= b < 1 for b in cfg.train.betas), "train.betas", "must be two numbers in [0, 1)")
    one_of("train.lr_schedule", ["constant", "cosine", "linear"])
    one_of("train.parallel", ["ddp", "fsdp2"])
    one_of("model.dtype", ["float32", "bfloat16", "float16"])
    need(cfg.model.num_heads % max(cfg.model.num_kv_heads, 1) == 0, "model.num_kv_heads", "must divide model.num_heads")
    need(cfg.model.hidden_size % cfg.model.num_heads == 0, "model.hidden_size", "must be a multiple of model.num_heads")
    need(cfg.model.lora_r >= 0, "model.lora_r", "must be >= 0")
    need(cfg.data.num_eval >= 1, "data.num_eval", "must be >= 1")
    need(0 < cfg.data.eval_fraction < 1, "data.eval_fraction", "must be in (0, 1)")
    from thinkrl.data.formats import FORMATS

    one_of("data.format", list(FORMATS))
    need(cfg.eval.k >= 0, "eval.k", "must be >= 0")
    need(cfg.eval.sft_every >= 0, "eval.sft_every", "must be >= 0 (0: none)")
    from thinkrl.train.dpo import DPO_LOSSES

    one_of("dpo.loss", list(DPO_LOSSES))
    need(cfg.dpo.beta > 0, "dpo.beta", "must be > 0")
    need(0 <= cfg.dpo.label_smoothing < 0.5, "dpo.label_smoothing", "must be in [0, 0.5)")
    need(cfg.dpo.steps >= 0, "dpo.steps", "must be >= 0")
    need(cfg.dpo.sft_coef >= 0, "dpo.sft_coef", "must be >= 0")
    need(cfg.dpo.batch_size >= 1, "dpo.batch_size", "must be >= 1")
    need(cfg.dpo.lr > 0, "dpo.lr", "must be > 0")
    need(cfg.dpo.warmup_steps >= 0, "dpo.warmup_steps", "must be >= 0")
    need(cfg.dpo.max_pairs >= 0, "dpo.max_pairs", "must be >= 0 (0: all)")
    need(cfg.eval.price_per_mtok >= 0, "eval.price_per_mtok", "must be >= 0")
    from thinkrl.logs import missing_package, sink_names  # the logging-sink registry

    for name in cfg.log.backends:
        if name not in sink_names():
            raise ConfigError(f"log.backends: unknown backend {name!r}; valid: {', '.join(sink_names())}")
        if missing_package(name):
            raise ConfigError(f"log.backends: {name} needs the {missing_package(name)} package "
                              "(pip install 'thinkrl[log]')")
    one_of("log.wandb_mode", ["offline", "online"])
    need(cfg.run.device == "auto" or cfg.run.device.split(":")[0] in ("cpu", "cuda", "mps", "xpu"), "run.device", "must be auto, cpu, cuda[:N], mps or xpu")

    cfg.algo.validate()
    from thinkrl.algo import registered_advantages, registered_losses, registered_kl, registered_loss_aggs

    one_of("algo.advantage", registered_advantages())
    one_of("algo.loss", registered_losses())
    one_of("algo.kl_estimator", registered_kl())
    one_of("algo.loss_agg", registered_loss_aggs())
    if ":" not in cfg.task.name:
        from thinkrl.tasks import registered_tasks

        one_of("task.name", registered_tasks())
    combinations(cfg)
    return cfg


def combinations(cfg: Config) -> None:
    """Combinations of fields that no code path supports, each refused with one line naming the keys."""
    r, a, eta = cfg.rollout, cfg.algo, cfg.rollout.max_staleness

    def refuse(cond: bool, msg: str) -> None:
        if cond:
            raise ConfigError(msg)

    refuse(eta > 0 and a.loss == "ppo",
           f"algo.loss=ppo with rollout.max_staleness={eta}: off-policy batches need a proximal policy; set "
           "algo.loss=decoupled_ppo (the trainer's weights before the step), or rollout.max_staleness=0")
    refuse(r.placement == "process" and r.engine != "embedded",
           f"rollout.placement=process: runs the embedded engine, got rollout.engine={r.engine!r}")
    refuse(eta > 0 and r.engine == "hf" and r.placement != "process",
           "rollout.engine=hf shares the trainer's weights: rollout.max_staleness > 0 needs rollout.engine=embedded")
    refuse(r.weight_sync == "memory" and (r.placement == "process" or (r.placement == "auto" and eta > 0
                                                                        and r.engine == "embedded")),
           "rollout.weight_sync=memory: needs the engine in this process (rollout.placement=inline)")
    refuse(cfg.run.deterministic and r.engine == "remote",
           "run.deterministic: a remote server's batching is not ours to fix; use rollout.engine=embedded")
    refuse(cfg.run.deterministic and eta > 0 and a.dynamic_sampling,
           "run.deterministic with algo.dynamic_sampling: supported with rollout.max_staleness=0 only")
    refuse(cfg.train.world_size > 1 and (eta > 0 or cfg.cluster.backend != "local"),
           "train.world_size > 1: data-parallel training runs with rollout.max_staleness=0 and cluster.backend=local")
    refuse(bool(a.distill_teacher) and "://" not in a.distill_teacher and not cfg.train.packing,
           "algo.distill_teacher: a local teacher's forward is packed; needs train.packing=true")
    c = cfg.cluster
    if c.backend == "ray":
        refuse(bool(a.distill_teacher), "algo.distill_teacher: the Ray backend has no teacher; use cluster.backend=local")
        refuse(a.kl_coef > 0, "algo.kl_coef > 0: the Ray backend has no reference model; use cluster.backend=local")
        refuse(a.advantage == "gae", "algo.advantage=gae: the Ray backend has no critic; use cluster.backend=local")
        for k in ("engine_cpus", "engine_gpus", "trainer_cpus", "trainer_gpus"):
            refuse(getattr(c, k) < 0, f"cluster.{k}: must be >= 0, got {getattr(c, k)}")
        refuse(c.engine_cpus + c.engine_gpus == 0 or c.trainer_cpus + c.trainer_gpus == 0,
               "cluster.engine_cpus/engine_gpus and trainer_cpus/trainer_gpus: each actor needs a resource")
        refuse(cfg.run.device.startswith("cuda") and (c.trainer_gpus == 0 or c.engine_gpus == 0),
               f"run.device={cfg.run.device} with cluster.backend=ray: every actor computes on a GPU it reserves; set "
               "cluster.trainer_gpus and cluster.engine_gpus > 0, or run.device=auto (actors without a GPU on the CPU)")


def _get(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for p in key.split("."):
        obj = getattr(obj, p)
    return obj


def load_config(path: str | Path | list | None = None, overrides: list[str] | None = None, base: Config | None = None) -> Config:
    """Build a Config from defaults (or `base`), YAML file(s) applied in order, and `key=value` overrides.

    `path` may be a list: later files override earlier ones (e.g. the quickstart + an algo preset).
    """
    cfg = base if base is not None else Config()
    valid = _all_keys(Config)
    for p in path if isinstance(path, (list, tuple)) else ([path] if path else []):
        p = Path(p)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{p}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(data).__name__}")
        try:
            _apply(cfg, data, "", valid)
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r}: expected key=value (e.g. algo.lr=1e-5)")
        k, v = ov.split("=", 1)
        _set_dotted(cfg, k.strip(), v.strip(), valid)
    return validate(cfg)
