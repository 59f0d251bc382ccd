"""Weight transports: how the trainer's weights get into inference engines. One set, both halves here.

    sync = make_weight_sync("auto", engines)        # auto | memory | shm | disk | dist | engine
    sync.push(trainer.export_weights(), version)    # returns once every engine generates with `version`

An engine's update_weights(src, version) takes what its `caps.transports` name (thinkrl.rollout.base):
- memory: a state dict or nn.Module of this process; an in-process engine copies it in place.
- disk:   a safetensors file or directory (`DiskStore` keeps the last `keep` versions); remote servers load it
          with /update_weights_from_disk (the directory must be visible to them).
- pipe | shm | dist: the channels of an engine process (thinkrl.rollout.process.ProcessEngine). The parent
          half is a sender (`make_sender`): `pack` turns the state dict into a load message, `deliver` runs
          once the engine process has it; the engine process turns the message back into tensors with
          `Receiver.unpack`. pipe: the state dict pickled over the control pipe. shm: one shared-memory copy
          both processes map (two memcpys, no serialisation). dist: a torch.distributed broadcast in a gloo
          group of its own (TCPStore), which never touches the trainer's default process group; tensors
          travel as one flat buffer per dtype.
- object_store: Ray's (thinkrl.system.ray_).
Every sync loads through each engine's load_weights (pause -> update_weights -> resume) at a token boundary.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

SYNC_KINDS = ("auto", "memory", "shm", "disk", "dist", "engine")
TIMEOUT = timedelta(seconds=300)


# ============================================================================ tensors and files
def as_state_dict(src) -> Mapping[str, torch.Tensor]:
    sd = src.state_dict() if isinstance(src, torch.nn.Module) else src
    if not isinstance(sd, Mapping):
        raise ValueError(f"weights: expected a state dict or an nn.Module, got {type(src).__name__}")
    return sd


def is_path(src) -> bool:
    return isinstance(src, (str, os.PathLike))


def unique_tensors(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop names whose tensor shares storage with an earlier one (tied embeddings): engines refill them."""
    seen, out = set(), {}
    for k, v in sd.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) if v.numel() else (k,)
        if key not in seen:
            seen.add(key)
            out[k] = v
    return out


def cpu_state_dict(sd) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in unique_tensors(as_state_dict(sd)).items()}


def save_safetensors(sd, path: str | Path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(cpu_state_dict(sd), str(tmp))
    tmp.rename(path)  # a reader sees the whole file or none
    return path


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of every *.safetensors file in a directory."""
    from safetensors.torch import load_file

    p = Path(path)
    files = [p] if p.is_file() else sorted(p.glob("*.safetensors")) if p.is_dir() else []
    if not files:
        raise ValueError(f"weights: no safetensors file at {p}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd


def tensors_of(src) -> Mapping[str, torch.Tensor]:
    """A state dict from what an in-process engine's update_weights takes: a state dict, an nn.Module, or a
    safetensors path."""
    return load_safetensors(src) if is_path(src) else as_state_dict(src)


class DiskStore:
    """Versioned safetensors under one directory (a temporary one by default); keeps the last `keep` versions."""

    def __init__(self, directory: str | Path | None = None, keep: int = 2):
        if keep < 1:
            raise ValueError(f"DiskStore: keep must be >= 1, got {keep}")
        self._own = directory is None
        self.root = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="thinkrl-weights-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep = keep

    def save(self, sd, version: int) -> Path:
        d = self.root / f"v{version:08d}"
        save_safetensors(sd, d / "model.safetensors")
        old = sorted(p for p in self.root.iterdir() if p.is_dir() and p.name.startswith("v"))[:-self.keep]
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
        return d

    def close(self) -> None:
        if self._own:
            shutil.rmtree(self.root, ignore_errors=True)


class SharedWeights:
    """A shared-memory copy of a state dict; pass `tensors` to another process (torch.multiprocessing) once."""

    def __init__(self, sd):
        self.tensors = {k: torch.empty(v.shape, dtype=v.dtype).share_memory_() for k, v in cpu_state_dict(sd).items()}

    @torch.no_grad()
    def write(self, sd) -> None:
        sd = as_state_dict(sd)
        for k, t in self.tensors.items():
            t.copy_(sd[k])

    def close(self) -> None:
        self.tensors = {}


def flat_spec(sd) -> list[tuple[str, tuple, str]]:
    return [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in unique_tensors(as_state_dict(sd)).items()]


def _buffers(spec) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One flat buffer per dtype, and per-name views into them."""
    sizes: dict[str, int] = {}
    for _, shape, dt in spec:
        sizes[dt] = sizes.get(dt, 0) + int(torch.Size(shape).numel())
    flats = {dt: torch.empty(n, dtype=getattr(torch, dt)) for dt, n in sizes.items()}
    views, off = {}, dict.fromkeys(sizes, 0)
    for name, shape, dt in spec:
        n = int(torch.Size(shape).numel())
        views[name] = flats[dt][off[dt]: off[dt] + n].view(shape)
        off[dt] += n
    return flats, views


# ============================================================================ engine-process channels
class Sender:
    """The parent's half of an engine-process channel."""

    def __init__(self, directory: str | Path | None = None):
        pass

    def pack(self, sd, version: int) -> tuple:
        """The load message for `sd` (sent with the engine process's "load" operation)."""
        raise NotImplementedError

    def deliver(self) -> None:
        """Runs after the engine process was sent the message, before waiting for its load."""

    def close(self) -> None:
        pass


class PipeSender(Sender):
    """pipe: the state dict travels with the load message."""

    def pack(self, sd, version: int) -> tuple:
        return ("pipe", cpu_state_dict(sd))


class DiskSender(Sender):
    """disk: the load message names a safetensors directory (DiskStore)."""

    def __init__(self, directory: str | Path | None = None):
        self.store = DiskStore(directory)

    def pack(self, sd, version: int) -> tuple:
        return ("disk", str(self.store.save(sd, version)))

    def close(self) -> None:
        self.store.close()


class ShmSender(Sender):
    """shm: the weights are written into one shared-memory copy; the first message hands it over."""

    def __init__(self, directory: str | Path | None = None):
        self.shared: SharedWeights | None = None

    def pack(self, sd, version: int) -> tuple:
        first = self.shared is None
        if first:
            self.shared = SharedWeights(sd)
        self.shared.write(sd)
        return ("shm", self.shared.tensors if first else None)

    def close(self) -> None:
        if self.shared is not None:
            self.shared.close()


class BroadcastSender(Sender):
    """dist: rank 0 of a gloo group of two with the engine process; the first message carries the rendezvous
    (address, rank, size, tensor layout), `deliver` broadcasts the flat buffers."""

    def __init__(self, directory: str | Path | None = None, host: str = "127.0.0.1"):
        self.host, self.store, self.pg = host, None, None
        self.flats: dict[str, torch.Tensor] = {}
        self.views: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def pack(self, sd, version: int) -> tuple:
        sd = as_state_dict(sd)
        join = None
        if self.store is None:
            spec = flat_spec(sd)
            self.store = dist.TCPStore(self.host, 0, world_size=2, is_master=True, wait_for_workers=False,
                                       timeout=TIMEOUT)
            self.flats, self.views = _buffers(spec)
            join = (self.host, self.store.port, 1, 2, spec)
        for name, view in self.views.items():
            view.copy_(sd[name])
        return ("dist", join)

    def deliver(self) -> None:
        if self.pg is None:  # rendezvous with the receiver, which joins when the first message arrives
            self.pg = dist.ProcessGroupGloo(self.store, 0, 2, TIMEOUT)
        for dt in sorted(self.flats):
            self.pg.broadcast(self.flats[dt], 0).wait()

    def close(self) -> None:
        self.pg = self.store = None


SENDERS = {"pipe": PipeSender, "shm": ShmSender, "disk": DiskSender, "dist": BroadcastSender}
CHANNELS = tuple(SENDERS)  # the transports of an engine process


def make_sender(kind: str, directory: str | Path | None = None) -> Sender:
    if kind not in SENDERS:
        raise ValueError(f"transport must be one of {', '.join(CHANNELS)}, got {kind!r}")
    return SENDERS[kind](directory)


class BroadcastReceiver:
    """Engine side of `dist`: rank `rank` of the gloo group; receive() fills and returns the weights."""

    def __init__(self, host: str, port: int, rank: int, size: int, spec):
        self.store = dist.TCPStore(host, port, world_size=size, is_master=False, wait_for_workers=False,
                                   timeout=TIMEOUT)
        self.pg = dist.ProcessGroupGloo(self.store, rank, size, TIMEOUT)
        self.flats, self.views = _buffers(spec)

    def receive(self) -> dict[str, torch.Tensor]:
        for dt in sorted(self.flats):
            self.pg.broadcast(self.flats[dt], 0).wait()
        return self.views

    def close(self) -> None:
        self.pg = self.store = None


class Receiver:
    """The engine process's half of every channel: a load message (from a sender's `pack`) -> the tensors."""

    def __init__(self):
        self.shared: dict[str, torch.Tensor] | None = None
        self.bcast: BroadcastReceiver | None = None

    def unpack(self, msg: tuple) -> Mapping[str, torch.Tensor]:
        kind, arg = msg
        if kind == "pipe":
            return arg
        if kind == "disk":
            return load_safetensors(arg)
        if kind == "shm":
            self.shared = arg if arg is not None else self.shared
            return self.shared
        if kind == "dist":
            if arg is not None:
                self.bcast = BroadcastReceiver(*arg)
            return self.bcast.receive()
        raise ValueError(f"unknown weight transport {kind!r}")

    def close(self) -> None:
        if self.bcast is not None:
            self.bcast.close()


# ============================================================================ the controller's interface
class WeightSync:
    """push(state_dict, version): every engine serves `version` when it returns; each loads it through its
    own load_weights (so through its own transport)."""

    def __init__(self, engines, name: str = "engine"):
        self.engines, self.name = list(engines), name
        if not self.engines:
            raise ValueError("weight sync: no engines")

    def push(self, sd, version: int) -> None:
        for e in self.engines:
            e.load_weights(sd, version)

    def push_from(self, trainer, version: int) -> None:
        """Push the trainer's current weights (transports that move them trainer -> engine directly override)."""
        self.push(trainer.export_weights(), version)

    def close(self) -> None:
        pass


class DiskSync(WeightSync):
    """Writes each version once (safetensors, DiskStore) and has every engine load that directory."""

    def __init__(self, engines, directory: str | Path | None = None, keep: int = 2):
        super().__init__(engines, "disk")
        self.store = DiskStore(directory, keep)

    def push(self, sd, version: int) -> None:
        path = self.store.save(sd, version)
        for e in self.engines:
            e.load_weights(path, version)

    def close(self) -> None:
        self.store.close()


def make_weight_sync(kind: str, engines, directory: str | Path | None = None) -> WeightSync:
    """kind: auto or engine (each engine's own transport), disk (written once, every engine loads the file), or
    memory | shm | dist, which the engines must be loading through already (their `transport`)."""
    if kind not in SYNC_KINDS:
        raise ValueError(f"rollout.weight_sync: unknown value {kind!r}; valid: {', '.join(SYNC_KINDS)}")
    engines = list(engines)
    for e in engines:
        if kind == "disk" and "disk" not in e.caps.transports:
            raise ValueError(f"rollout.weight_sync=disk: the {e.name} engine cannot load from disk "
                             f"(it loads through {', '.join(e.caps.transports)})")
        if kind in ("memory", "shm", "dist") and e.transport != kind:
            where = "an engine in this process" if kind == "memory" else "an engine process (rollout.placement=process)"
            raise ValueError(f"rollout.weight_sync={kind}: needs {where}; the {e.name} engine loads through "
                             f"{e.transport}")
    return DiskSync(engines, directory) if kind == "disk" else WeightSync(engines, kind)
