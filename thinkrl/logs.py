"""Where metrics go: RUN_DIR/metrics.jsonl always, and the sinks `log.backends` names, under the same names.

    logger = Logger.open(run_dir, cfg, start_step)   # start_step > 0: a resumed run continues the same logs
    logger.log({"step": 3, "reward/mean": 0.5, "phase": "sft"})
    logger.close()                                    # flushes; also at the end of a run and on errors

Every record carries `step` (an int). metrics.jsonl gets the whole record; the scalar sinks get its numeric values
(booleans and non-numbers such as `phase` are skipped) with the metric name as the tag and `step` as the global
step. Sinks (`register_sink`; `log.backends` is checked against them at config load):

- ``jsonl``: RUN_DIR/metrics.jsonl, one JSON object a line, appended and closed per record (a kill loses nothing
  written). Always on.
- ``tensorboard``: an event file under RUN_DIR/tensorboard (torch.utils.tensorboard's SummaryWriter). A resumed
  run opens the writer with ``purge_step=start_step + 1``, so TensorBoard drops the old run's records after the
  checkpoint and shows each step once.
- ``wandb``: a W&B run in RUN_DIR/wandb, ``log.wandb_mode`` offline by default (no network; ``wandb sync``
  uploads it later). Its id is kept in RUN_DIR/wandb_id, and a resumed run continues that id (resume="allow").
  Offline, each start writes its own ``offline-run-*`` directory with that id, and ``wandb sync`` uploads them
  into the one run. Closing it calls ``wandb.teardown()`` to wait for the records to reach the disk, which also
  ends any other W&B run open in the process.

MLflow is not a sink: it is not a dependency, and TensorBoard and W&B cover what people look at.
"""
from __future__ import annotations

import json
import math
import numbers
import secrets
from pathlib import Path
from typing import Callable

METRICS_FILE = "metrics.jsonl"
SINKS: dict[str, Callable] = {}


def register_sink(name: str):
    def deco(cls):
        SINKS[name] = cls
        return cls

    return deco


def sink_names() -> list[str]:
    return sorted(SINKS)


def missing_package(name: str) -> str | None:
    """The package sink `name` needs that is not installed, or None (checked at config load)."""
    import importlib.util

    pkg = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(name)
    return pkg if pkg is not None and importlib.util.find_spec(pkg) is None else None


def scalars(record: dict) -> dict[str, float]:
    """The numeric values of a record (not `step`, not booleans), as floats: what the scalar sinks log."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, numbers.Real) and not isinstance(v, bool)}


@register_sink("jsonl")
class JsonlSink:
    def __init__(self, run_dir: Path, cfg, start_step: int):
        self.path = Path(run_dir) / METRICS_FILE

    def log(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        pass


@register_sink("tensorboard")
class TensorBoardSink:
    def __init__(self, run_dir: Path, cfg, start_step: int):
        from torch.utils.tensorboard import SummaryWriter
        self.logdir = Path(run_dir) / "tensorboard"
        self.writer = SummaryWriter(str(self.logdir), purge_step=start_step + 1 if start_step > 0 else None)

    def log(self, record: dict) -> None:
        step = int(record["step"])
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, global_step=step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


@register_sink("wandb")
class WandbSink:
    ID_FILE = "wandb_id"

    def __init__(self, run_dir: Path, cfg, start_step: int):
        import wandb

        run_dir = Path(run_dir)
        id_file = run_dir / self.ID_FILE
        if start_step > 0 and id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            run_id = secrets.token_hex(4)
            id_file.write_text(run_id + "\n")
        log = cfg.log
        self.run = wandb.init(project=log.wandb_project, name=log.wandb_name or run_dir.resolve().name,
                              dir=str(run_dir), mode=log.wandb_mode, id=run_id, resume="allow",
                              config=cfg.to_dict(), reinit="create_new")
        self.run_id = run_id

    def log(self, record: dict) -> None:
        values = {k: v for k, v in scalars(record).items() if math.isfinite(v)}
        self.run.log(values, step=int(record["step"]))

    def close(self) -> None:
        import wandb

        self.run.finish()
        # finish() can return before W&B's service process has written the run's last records to disk (seen
        # offline with wandb 0.31); teardown waits for the service to flush and stop (a later run starts it again)
        wandb.teardown()


class Logger:
    """The run's metrics sinks: metrics.jsonl plus those `cfg.log.backends` names, each record to every one."""

    def __init__(self, sinks: list):
        self.sinks = sinks

    @classmethod
    def open(cls, run_dir: str | Path, cfg=None, start_step: int = 0) -> "Logger":
        """jsonl alone without a config; else jsonl and `cfg.log.backends`. `start_step` > 0: a resumed run (its
        records after `start_step` are logged again; metrics.jsonl is truncated by the caller)."""
        names = ["jsonl"] + [b for b in (cfg.log.backends if cfg is not None else []) if b != "jsonl"]
        sinks = []
        try:
            for name in dict.fromkeys(names):
                sinks.append(SINKS[name](Path(run_dir), cfg, start_step))
        except BaseException:
            for s in sinks:
                s.close()
            raise
        return cls(sinks)

    def log(self, record: dict) -> None:
        if not isinstance(record.get("step"), int) or isinstance(record.get("step"), bool):
            raise ValueError(f"metrics record without an integer 'step': {sorted(record)}")
        for s in self.sinks:
            s.log(record)

    def close(self) -> None:
        """Flush and close every sink (each one even when another fails); idempotent."""
        sinks, self.sinks = self.sinks, []
        errors = []
        for s in sinks:
            try:
                s.close()
            except Exception as e:  # close the others, then report the first failure
                errors.append(e)
        if errors:
            raise errors[0]

    def __enter__(self) -> "Logger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
