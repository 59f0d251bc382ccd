"""Weight sync: getting the trainer's weights into the inference engines, behind one interface.

    sync = make_weight_sync("auto", engines)        # memory | shm | disk | dist | engine
    sync.push(trainer.export_weights(), version)    # returns once every engine generates with `version`

Transports
- memory: engines in this process (EmbeddedEngine): pause() -> update_weights(state_dict) -> resume().
- shm:    engine processes on this machine (ProcessEngine): one shared-memory copy of the weights that every
          engine process maps; a push copies the new weights into it, then each process loads it (pause -> copy
          -> resume). Two memcpys, no serialisation.
- disk:   safetensors in a directory (kept: the last `keep` versions); each engine loads the file:
          ProcessEngine/Ray actors via load_from_disk(path, version), remote SGLang/thinkrl servers via
          update_weights(path) (/update_weights_from_disk: the directory must be visible to the servers), an
          in-process engine by reading the file here.
- dist:   torch.distributed broadcast from the trainer (rank 0) to engine processes (ranks 1..N) in a process
          group of their own (TCPStore + gloo), so it never touches the trainer's default process group. Tensors
          travel as one flat buffer per dtype.
- engine: each engine's own update_weights (ProcessEngine: its transport; RayEngine: the object store).
Every transport updates in place at a token boundary: in-flight sequences keep going (partial rollout).
"""
from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.distributed as dist

SYNC_KINDS = ("auto", "memory", "shm", "disk", "dist", "engine")


# ============================================================================ helpers (both halves)
def as_state_dict(src) -> Mapping[str, torch.Tensor]:
    sd = src.state_dict() if isinstance(src, torch.nn.Module) else src
    if not isinstance(sd, Mapping):
        raise ValueError(f"weights: expected a state dict or an nn.Module, got {type(src).__name__}")
    return sd


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


def _group(host: str, port: int, rank: int, size: int, timeout_s: float = 300.0):
    from datetime import timedelta

    store = dist.TCPStore(host, port, world_size=size, is_master=rank == 0, wait_for_workers=False,
                          timeout=timedelta(seconds=timeout_s))
    return store, dist.ProcessGroupGloo(store, rank, size, timedelta(seconds=timeout_s))


class BroadcastReceiver:
    """Engine side of the `dist` transport: rank `rank` of a gloo group; receive() fills and returns the weights."""

    def __init__(self, host: str, port: int, rank: int, size: int, spec):
        self.store, self.pg = _group(host, port, rank, size)
        self.flats, self.views = _buffers(spec)

    def receive(self) -> dict[str, torch.Tensor]:
        for dt in sorted(self.flats):
            self.pg.broadcast(self.flats[dt], 0).wait()
        return self.views

    def close(self) -> None:
        self.pg = self.store = None


class BroadcastSender:
    """Trainer side of the `dist` transport: rank 0 of a group with the engine processes (ranks 1..N)."""

    def __init__(self, engines, sd, host: str = "127.0.0.1"):
        from thinkrl.system.engine_worker import wait_all

        self.engines = list(engines)
        self.spec = flat_spec(sd)
        size = len(self.engines) + 1
        self.store = dist.TCPStore(host, 0, world_size=size, is_master=True, wait_for_workers=False)
        futs = [e.control("join_pg", host, self.store.port, i + 1, size, self.spec) for i, e in enumerate(self.engines)]
        from datetime import timedelta

        self.pg = dist.ProcessGroupGloo(self.store, 0, size, timedelta(seconds=300))  # rendezvous with the engines
        wait_all(futs, timeout=300)
        self.flats, self.views = _buffers(self.spec)

    @torch.no_grad()
    def push(self, sd, version: int) -> None:
        from thinkrl.system.engine_worker import wait_all

        sd = as_state_dict(sd)
        for name, view in self.views.items():
            view.copy_(sd[name])
        futs = [e.control("load_pg", version) for e in self.engines]  # each joins the broadcast, then loads
        for dt in sorted(self.flats):
            self.pg.broadcast(self.flats[dt], 0).wait()
        wait_all(futs)
        for e in self.engines:
            e.version = version

    def close(self) -> None:
        self.pg = self.store = None


# ============================================================================ the controller's interface
class WeightSync:
    """push(state_dict, version): every engine serves `version` when it returns."""

    name = "engine"

    def __init__(self, engines):
        self.engines = list(engines)
        if not self.engines:
            raise ValueError("weight sync: no engines")

    def push(self, sd, version: int) -> None:
        for e in self.engines:
            e.update_weights(sd, version)

    def push_from(self, trainer, version: int) -> None:
        """Push the trainer's current weights (transports that move them trainer -> engine directly override)."""
        self.push(trainer.export_weights(), version)

    def close(self) -> None:
        pass


class MemorySync(WeightSync):
    name = "memory"

    def push(self, sd, version: int) -> None:
        sd = as_state_dict(sd)
        for e in self.engines:
            e.pause()
        try:
            for e in self.engines:
                e.update_weights(sd, version)
        finally:
            for e in self.engines:
                e.resume()


class DiskSync(WeightSync):
    name = "disk"

    def __init__(self, engines, directory: str | Path | None = None, keep: int = 2):
        super().__init__(engines)
        self.store = DiskStore(directory, keep)

    def push(self, sd, version: int) -> None:
        path = self.store.save(sd, version)
        futs = []
        for e in self.engines:
            if hasattr(e, "control"):  # engine processes load concurrently
                futs.append(e.control("load_disk", str(path), version))
                e.version = version
            elif hasattr(e, "load_from_disk"):
                e.load_from_disk(path, version)
            elif hasattr(e, "runner"):  # an in-process embedded engine
                e.pause()
                try:
                    e.update_weights(load_safetensors(path), version)
                finally:
                    e.resume()
            else:  # remote servers: /update_weights_from_disk
                e.update_weights(str(path), version)
        for f in futs:
            f.result()

    def close(self) -> None:
        self.store.close()


class SharedMemorySync(WeightSync):
    name = "shm"

    def __init__(self, engines):
        super().__init__(engines)
        if not all(hasattr(e, "control") for e in self.engines):
            raise ValueError("rollout.weight_sync=shm: needs engine processes (ProcessEngine)")
        self.shared: SharedWeights | None = None

    def push(self, sd, version: int) -> None:
        if self.shared is None:
            self.shared = SharedWeights(sd)
            for f in [e.control("attach_shm", self.shared.tensors) for e in self.engines]:
                f.result()
        self.shared.write(sd)
        for f in [e.control("load_shm", version) for e in self.engines]:
            f.result()
        for e in self.engines:
            e.version = version

    def close(self) -> None:
        if self.shared is not None:
            self.shared.close()


class BroadcastSync(WeightSync):
    name = "dist"

    def __init__(self, engines):
        super().__init__(engines)
        if not all(hasattr(e, "control") for e in self.engines):
            raise ValueError("rollout.weight_sync=dist: needs engine processes (ProcessEngine)")
        self.sender: BroadcastSender | None = None

    def push(self, sd, version: int) -> None:
        if self.sender is None:
            self.sender = BroadcastSender(self.engines, sd)
        self.sender.push(sd, version)

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()


def make_weight_sync(kind: str, engines, directory: str | Path | None = None) -> WeightSync:
    """kind: auto (memory for in-process engines, shm for engine processes, else each engine's own), or one of
    memory, shm, disk, dist, engine."""
    if kind not in SYNC_KINDS:
        raise ValueError(f"rollout.weight_sync: unknown value {kind!r}; valid: {', '.join(SYNC_KINDS)}")
    engines = list(engines)
    if kind == "auto":
        if engines and all(hasattr(e, "control") for e in engines):
            kind = "shm"
        elif engines and all(hasattr(e, "runner") for e in engines):
            kind = "memory"
        else:
            kind = "engine"
    cls = {"memory": MemorySync, "shm": SharedMemorySync, "dist": BroadcastSync, "engine": WeightSync}.get(kind)
    return DiskSync(engines, directory) if kind == "disk" else cls(engines)
