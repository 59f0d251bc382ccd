"""The run directory: the resolved config (config.yaml), metrics.jsonl, checkpoints/ and what `--resume` checks.

    rundir = RunDir(cfg.run.output_dir)
    rundir.write_config(cfg, resume)                   # on resume: stops if the config would change the results
    ckpt = rundir.resume_checkpoint()                  # newest verified checkpoint (warns about bad ones)
    state = load_state(ckpt); set_rng_state(state["rng"]); ...
    rundir.save_checkpoint(step, model, tokenizer, {"trainer": ..., "rng": rng_state(), ...}, keep)
    rundir.open_logs(cfg, start_step)                  # metrics.jsonl + log.backends (thinkrl/logs.py)
    rundir.log({"step": 1, ...}); rundir.close_logs()  # close at the end and on errors

The checkpoint format and its atomic write are in `thinkrl/system/checkpoint.py`.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import yaml

from thinkrl.config import Config, ConfigError
from thinkrl.system.checkpoint import (good_checkpoint, list_checkpoints, output_error, remove_leftovers,
                                       write_checkpoint)
# what a caller needs beside RunDir to resume, importable from here too
from thinkrl.system.checkpoint import load_state, load_weights_into, rng_state, set_rng_state  # noqa: F401
from thinkrl.logs import METRICS_FILE, Logger

log = logging.getLogger("thinkrl")

# Keys a resumed run may change: they decide how long it runs and what it reports, not what it computes.
RESUME_MAY_DIFFER = ("train.steps", "train.save_every", "train.keep_checkpoints", "log.", "eval.", "run.output_dir",
                     "run.threads")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume_config(saved: dict, cfg) -> None:
    """Raise ConfigError naming the keys where `cfg` differs from a run's saved config in ways that change results.

    A key the saved config lacks (a field added since) compares as its default."""
    as_saved = lambda c: _flatten(yaml.safe_load(yaml.safe_dump(c.to_dict())))  # noqa: E731  (YAML's types)
    old = {**as_saved(Config()), **_flatten(saved)}
    new = as_saved(cfg)
    keys = sorted(set(old) | set(new))
    differ = [k for k in keys if old.get(k) != new.get(k)
              and not any(k == p or (p.endswith(".") and k.startswith(p)) for p in RESUME_MAY_DIFFER)]
    if differ:
        raise ConfigError(f"--resume: the config differs from the run's in {', '.join(differ)}; "
                          "start a new run.output_dir or restore them")


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:  # a path under a regular file, a read-only or full disk: one line naming it (OutputDirError)
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise output_error(self.path, e, "cannot create this run.output_dir") from e
        self.metrics_path = self.path / METRICS_FILE
        self.logger = Logger.open(self.path)  # metrics.jsonl only until open_logs
        self.config_path = self.path / "config.yaml"
        self.ckpt_root = self.path / "checkpoints"

    # ------------------------------------------------------------------ config
    def write_config(self, cfg, resume: bool = False) -> None:
        """Save the resolved config; on resume first check it against the saved one (`check_resume_config`)."""
        if resume and self.config_path.exists():
            check_resume_config(yaml.safe_load(self.config_path.read_text()) or {}, cfg)
        try:
            cfg.save(self.config_path)
        except OSError as e:
            raise output_error(self.config_path, e, "cannot write the run's config") from e

    # ------------------------------------------------------------------ metrics
    def open_logs(self, cfg, start_step: int = 0) -> None:
        """Log to metrics.jsonl and the sinks cfg.log.backends names; `start_step` > 0 continues a resumed run's
        logs (after `truncate_metrics(start_step)`)."""
        self.logger.close()
        self.logger = Logger.open(self.path, cfg, start_step)

    def close_logs(self) -> None:
        """Flush and close the sinks; later records go to metrics.jsonl only."""
        try:
            self.logger.close()
        finally:
            self.logger = Logger.open(self.path)

    def log(self, record: dict) -> None:
        """One metrics record (it carries an integer `step`) to every open sink."""
        try:
            self.logger.log(record)
        except OSError as e:  # e.g. the disk is full: the records before this one stay
            raise output_error(self.metrics_path, e, f"metrics of step {record.get('step')} not written") from e

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, step: int) -> None:
        """Drop records after `step` (a resumed run re-logs them)."""
        keep = [r for r in self.read_metrics() if r.get("step", 0) <= step]
        tmp = self.metrics_path.with_name(self.metrics_path.name + ".tmp")
        try:  # replaced whole or not at all: a failed write (full disk) leaves the old file as it was
            tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
            os.replace(tmp, self.metrics_path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise output_error(self.metrics_path, e, "cannot truncate the metrics for --resume") from e

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, step: int, model, tokenizer, state: dict, keep: int | None) -> Path:
        """Atomically write checkpoints/step_NNNNNN (HF model + `state` + manifest); keep the newest `keep` (None:
        all)."""
        return write_checkpoint(self.ckpt_root, step, model, tokenizer, state, keep)

    def checkpoints(self) -> list[Path]:
        """Finished checkpoint directories, oldest first (not verified)."""
        return list_checkpoints(self.ckpt_root)

    def good_checkpoint(self) -> tuple[Path | None, list[str]]:
        """(newest checkpoint whose manifest verifies or None, one warning line per bad newer one)."""
        return good_checkpoint(self.ckpt_root)

    def resume_point(self) -> Path | None:
        """For `--resume` of an RL run: the checkpoint to continue from, or None when the run was started here
        but stopped before its first checkpoint (it then starts again from step 0, its metrics truncated).
        Raises as `resume_checkpoint` when there is no run here, or only bad checkpoints."""
        ckpt, warnings = self.good_checkpoint()
        if ckpt is None and not warnings and self.config_path.exists() and not self.checkpoints():
            log.warning(f"--resume: no checkpoint yet in {self.ckpt_root}; starting from step 0")
            self.truncate_metrics(0)
            return None
        return self.resume_checkpoint()

    def resume_checkpoint(self) -> Path:
        """The checkpoint `--resume` continues from: warns (one line each) about bad ones, raises if none is good."""
        ckpt, warnings = self.good_checkpoint()
        for w in warnings:
            log.warning(w)
        if ckpt is None:
            why = f" ({len(warnings)} found, none verifies: {warnings[0]})" if warnings else ""
            raise ValueError(f"--resume: no checkpoint in {self.ckpt_root}{why}")
        remove_leftovers(self.ckpt_root)
        return ckpt
