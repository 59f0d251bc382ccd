"""The run directory: resolved config, metrics.jsonl, checkpoints (Hugging Face format) and resume."""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.path / "metrics.jsonl"
        self.ckpt_root = self.path / "checkpoints"

    # ------------------------------------------------------------------ metrics
    def log(self, record: dict) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, step: int) -> None:
        """Drop records after `step` (a resumed run re-logs them)."""
        keep = [r for r in self.read_metrics() if r.get("step", 0) <= step]
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in keep))

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_dir(self, step: int) -> Path:
        return self.ckpt_root / f"step_{step:06d}"

    def save_checkpoint(self, step: int, model, tokenizer, trainer=None, extra: dict | None = None, keep_last: int = 2) -> Path:
        d = self.checkpoint_dir(step)
        tmp = d.with_name(d.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        state = {
            "step": step,
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
            "extra": extra or {},
        }
        if trainer is not None:
            state["trainer"] = trainer.state_dict()
        torch.save(state, tmp / STATE_FILE)
        if d.exists():
            shutil.rmtree(d)
        tmp.rename(d)  # a checkpoint directory is complete or absent
        (self.ckpt_root / "latest").write_text(d.name)
        if keep_last:
            for old in self.checkpoints()[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        return d

    def checkpoints(self) -> list[Path]:
        if not self.ckpt_root.exists():
            return []
        found = [p for p in self.ckpt_root.iterdir() if p.is_dir() and re.fullmatch(r"step_\d+", p.name)]
        return sorted(found, key=lambda p: int(p.name.split("_")[1]))

    def last_checkpoint(self) -> Path | None:
        c = self.checkpoints()
        return c[-1] if c else None


def load_trainer_state(ckpt: Path, trainer=None) -> dict:
    state = torch.load(ckpt / STATE_FILE, weights_only=False)
    if trainer is not None and "trainer" in state:
        trainer.load_state_dict(state["trainer"])
    rng = state.get("rng")
    if rng:
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
    return state


def load_weights_into(model, ckpt: Path) -> None:
    """Load a checkpoint's weights into an existing model (same architecture)."""
    from safetensors.torch import load_file

    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{ckpt}: no safetensors weights")
    sd = {}
    for f in files:
        sd.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied embeddings are saved once
    if missing or unexpected:
        raise ValueError(f"{ckpt}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
