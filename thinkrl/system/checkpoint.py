"""Checkpoints that are complete or absent, verified at resume.

A checkpoint is a directory `checkpoints/step_NNNNNN/` holding

    config.json, model.safetensors, tokenizer files   the model in Hugging Face format (usable as a model dir)
    trainer_state.pt                                  the caller's `state` dict (torch.save), plus "step"
    manifest.json                                     {"step": N, "files": [{"path", "size", "sha256"}, ...]}

Writing (`write_checkpoint`): everything goes into `step_NNNNNN.tmp/` beside the target, every file and the
directory are fsynced, the manifest is written and fsynced last, and the directory is renamed into place (then
the parent is fsynced). A kill at any moment leaves either the finished directory or a `*.tmp` one, which
`good_checkpoint` ignores and the next write removes.

Reading (`good_checkpoint`): the newest checkpoint whose files all match the manifest's sizes and checksums;
each bad one (no manifest, a file missing, truncated or changed) gives one warning line naming it and the file.

A write that fails (an unwritable directory, a full disk) removes its `*.tmp` directory and raises
`OutputDirError` naming the checkpoint, the cause and the newest checkpoint still there, which is untouched.

Test hook: with the environment variable THINKRL_FAULT="kill_in_save:<step>", `write_checkpoint` of that step
SIGKILLs its own process after writing the model weights and before the rest of the files (tests of kill -9
during a checkpoint write). Nothing else reads THINKRL_FAULT.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import torch

from thinkrl.errors import RunFault

STATE_FILE = "trainer_state.pt"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"step_(\d+)")


class OutputDirError(RunFault):
    """The run directory cannot be written (unwritable, full); the message names the path and the cause."""


def output_error(path: Path, e: BaseException, what: str) -> OutputDirError:
    """One line: `path`, what could not be done and the cause; the free space where it failed when the disk may be
    full (ENOSPC, or a writer's own error such as safetensors' or torch.save's)."""
    if isinstance(e, OSError) and e.strerror:
        cause = e.strerror
    else:
        cause = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if not isinstance(e, OSError) or e.errno == errno.ENOSPC:
        try:
            free = shutil.disk_usage(next(p for p in [path, *path.parents] if p.exists())).free
            cause += f"; {free / 2**20:.1f} MiB free there"
        except (OSError, StopIteration):
            pass
    return OutputDirError(f"{path}: {what} ({cause})")


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoint directories under `root`, oldest step first (`*.tmp` ones are not listed)."""
    if not root.exists():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name)]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(ckpt: Path) -> int:
    return int(_STEP_DIR.fullmatch(ckpt.name).group(1))


# ----------------------------------------------------------------------------- writing


def _fsync(path: Path) -> None:
    """Flush a file's or a directory's contents to disk (a directory fsync makes its entries durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file() and p.name != MANIFEST)


def _maybe_fault(step: int) -> None:
    """The THINKRL_FAULT test hook (see the module docstring)."""
    if os.environ.get("THINKRL_FAULT", "") == f"kill_in_save:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def remove_leftovers(root: Path) -> None:
    """Delete `*.tmp` directories: writes a kill interrupted (they are never read)."""
    if root.exists():
        for p in root.iterdir():
            if p.is_dir() and p.name.endswith(".tmp"):
                shutil.rmtree(p, ignore_errors=True)


def write_checkpoint(root: Path, step: int, model, tokenizer, state: dict, keep: int | None) -> Path:
    """Write step `step`'s checkpoint atomically under `root`; keep the newest `keep` (None: every earlier one).
    Returns its directory.

    Checkpoints of later steps than `step` are deleted: they belong to a run this one resumed before, whose
    metrics were truncated, so the one just written is the newest."""
    if keep is not None and keep < 1:
        raise ValueError(f"train.keep_checkpoints: must be >= 1, got {keep}")
    final = root / checkpoint_name(step)
    tmp = root / (final.name + ".tmp")
    try:
        root.mkdir(parents=True, exist_ok=True)
        remove_leftovers(root)
        tmp.mkdir()
        _write(tmp, step, model, tokenizer, state)
    except Exception as e:  # noqa: BLE001 - full disk: OSError, safetensors' SafetensorError, torch's RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        kept = list_checkpoints(root) if root.is_dir() else []
        raise output_error(final, e, "checkpoint not written, " + (f"{kept[-1].name} is the newest one, untouched"
                                                                    if kept else "no earlier checkpoint")) from e
    if final.exists():  # the same step saved again (e.g. a periodic and the final save): replace it
        old = root / (final.name + ".old.tmp")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync(root)
    done = [c for c in list_checkpoints(root) if checkpoint_step(c) <= step]
    for c in [c for c in list_checkpoints(root) if checkpoint_step(c) > step] + (done[:-keep] if keep else []):
        shutil.rmtree(c)
    return final


def _write(tmp: Path, step: int, model, tokenizer, state: dict) -> None:
    """The files of a checkpoint, each fsynced, the manifest last."""
    model.save_pretrained(tmp)
    _maybe_fault(step)
    tokenizer.save_pretrained(tmp)
    torch.save({**state, "step": step}, tmp / STATE_FILE)
    entries = []
    for f in _files(tmp):
        _fsync(f)
        entries.append({"path": f.relative_to(tmp).as_posix(), "size": f.stat().st_size, "sha256": _sha256(f)})
    with (tmp / MANIFEST).open("w") as f:
        json.dump({"step": step, "files": entries}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for d in sorted({f.parent for f in _files(tmp)} | {tmp}, key=lambda p: -len(p.parts)):
        _fsync(d)


# ----------------------------------------------------------------------------- reading


def verify(ckpt: Path) -> str | None:
    """None if every file of the manifest is there with its size and checksum, else what is wrong (one line)."""
    mpath = ckpt / MANIFEST
    if not mpath.exists():
        return f"{ckpt}: no {MANIFEST} (an interrupted or foreign write)"
    try:
        entries = json.loads(mpath.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{ckpt}: {MANIFEST} is unreadable"
    for e in entries:
        f = ckpt / e["path"]
        if not f.is_file():
            return f"{ckpt}: {e['path']} is missing"
        size = f.stat().st_size
        if size != e["size"]:
            return f"{ckpt}: {e['path']} has {size} bytes, the manifest says {e['size']} (truncated?)"
        if _sha256(f) != e["sha256"]:
            return f"{ckpt}: {e['path']} does not match its checksum in the manifest (changed or corrupt)"
    return None


def good_checkpoint(root: Path) -> tuple[Path | None, list[str]]:
    """(the newest checkpoint that verifies, or None; one warning line per newer checkpoint that does not)."""
    warnings = []
    for ckpt in reversed(list_checkpoints(root)):
        problem = verify(ckpt)
        if problem is None:
            return ckpt, warnings
        warnings.append(f"skipping checkpoint {problem}")
    return None, warnings


def load_state(ckpt: Path) -> dict:
    """The `state` dict saved with the checkpoint (with "step")."""
    return torch.load(ckpt / STATE_FILE, weights_only=False)


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


# ----------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    """The python, numpy and torch (CPU, and CUDA when available) generators' states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
