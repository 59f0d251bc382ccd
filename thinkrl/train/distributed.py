"""Data-parallel training over torch.distributed: DDP or FSDP2; gloo on CPU, NCCL on CUDA.

    ctx = init_distributed(world_size, rank)              # or launch(fn, world_size, ...) to spawn the ranks
    trainer = TrainEngine(model, tcfg, acfg, dist=ctx)    # wraps the model (DDP / FSDP2) before the optimizer
    trainer.step(batch)                                   # every rank passes the SAME batch

Every rank sees the whole Batch and trains on its own packed micro-batches
(`make_micro_batches(..., world_size=W, rank=r)`: the same micro-batch count on every rank). Losses are
divided by GLOBAL token/sequence counts, so the batch loss is L = sum over ranks r of L_r. DDP and FSDP2
*average* gradients over ranks, so each rank back-propagates W * L_r: (1/W) sum_r grad(W L_r) = grad L,
exactly the one-process gradient of the whole batch (then clipped on the full gradient norm).

- ddp:   every rank holds the full model and optimizer state; gradients are all-reduced once per step
         (micro-batches before the last skip the sync).
- fsdp2: `fully_shard` on every decoder layer, then the root: parameters, gradients and optimizer state are
         sharded over ranks (dim 0); a layer's weights are all-gathered for its forward/backward and its
         gradients reduce-scattered. Rank 0 also keeps a full copy of the model for its inference engine.

In an RL run (thinkrl.system.launch.run_train) rank 0 runs the loop unchanged: it owns the inference
engine, generation, evaluation, logging and checkpoints. Ranks > 0 only train: they `serve` the trainer,
and rank 0's TrainEngine hands them every collective call (init, logprobs, step, export_weights,
state_dict, load_state_dict) with its arguments (`share`, a broadcast_object_list). After each step
rank 0 pushes the weights to its engine (FSDP2: the full state dict gathered to rank 0 first).

Without torchrun, `launch` spawns `world_size` processes (torch.multiprocessing); under torchrun
(RANK / WORLD_SIZE in the environment) each process is already one rank.
"""
from __future__ import annotations

import copy
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

MODES = ("ddp", "fsdp2")
TIMEOUT = timedelta(hours=6)  # ranks > 0 wait in a broadcast while rank 0 generates and evaluates
_CURRENT: "DistContext | None" = None


@dataclass
class DistContext:
    """This process's place in the data-parallel group (see module docstring)."""

    world_size: int
    rank: int
    mode: str = "ddp"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    leader: bool = False  # rank 0 drives ranks > 0 through `serve` (False: every rank calls the trainer itself)
    plain: torch.nn.Module | None = None  # fsdp2, rank 0: the unsharded model the engine uses (kept in sync)

    @property
    def loss_scale(self) -> float:
        """Each rank's loss is multiplied by this before backward (ranks' gradients are averaged)."""
        return float(self.world_size)

    # ------------------------------------------------------------------ rank 0 -> ranks > 0
    def share(self, method: str, *args) -> tuple:
        """Rank 0 in leader mode: tell the serving ranks to run trainer.`method`(*args). Returns args."""
        if self.leader and self.rank == 0:
            dist.broadcast_object_list([(method, args)], src=0)
        return args

    # ------------------------------------------------------------------ model
    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The training module: DDP(model), or a FSDP2-sharded model (on rank 0 a sharded copy)."""
        if self.mode == "fsdp2" and self.rank == 0:
            self.plain = model  # the engine and checkpoints keep using the full model
            model = copy.deepcopy(model)
        return wrap_model(model, self.mode, self.device)

    def grad_sync(self, model, enabled: bool) -> None:
        """Whether the next backward reduces gradients over ranks (off for all micro-batches but the last)."""
        if self.mode == "ddp":
            model.require_backward_grad_sync = enabled  # what DDP.no_sync() toggles; read at forward
        # fsdp2: reduce-scatter every micro-batch (keeps gradients sharded; no unsharded accumulation)

    # ------------------------------------------------------------------ results
    def reduce_metrics(self, per_micro_batch: list[dict]) -> dict[str, float]:
        """Loss metrics over every micro-batch of every rank (sums of contributions; `*_max`: max)."""
        from thinkrl.algo.losses import reduce_metrics

        parts: list = [None] * self.world_size
        dist.all_gather_object(parts, reduce_metrics(per_micro_batch))
        return reduce_metrics(parts)

    def sum(self, x: float) -> float:
        t = torch.tensor([float(x)], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return float(t.item())

    def gather_logprobs(self, local: list) -> list:
        """Merge per-rank results (None where another rank holds the sequence)."""
        parts: list = [None] * self.world_size
        dist.all_gather_object(parts, local)
        out = list(local)
        for part in parts:
            for i, v in enumerate(part):
                if v is not None:
                    out[i] = v
        missing = [i for i, v in enumerate(out) if v is None]
        if missing:
            raise RuntimeError(f"data parallel logprobs: no rank computed sequence {missing[0]}")
        return out

    def export(self, model) -> dict[str, torch.Tensor]:
        """Full weights on rank 0 ({} on other ranks; fsdp2 gathers, a collective)."""
        if self.mode == "ddp":
            return {k: v.detach() for k, v in model.module.state_dict().items()} if self.rank == 0 else {}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank != 0:
            return {}
        self.plain.load_state_dict(full)
        return {k: v.detach() for k, v in self.plain.state_dict().items()}

    def optimizer_state(self, model, optimizer) -> dict:
        """Full optimizer state (fsdp2: gathered to rank 0, a collective)."""
        if self.mode == "ddp":
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load(self, model, optimizer, optim_state: dict) -> None:
        """Rank 0's weights (as loaded into its model) and the full optimizer state onto every rank."""
        if self.mode == "ddp":
            broadcast_params(model.module)
            optimizer.load_state_dict(optim_state)
            return
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, self.plain.state_dict() if self.rank == 0 else {}, options=opts)
        set_optimizer_state_dict(model, optimizer, optim_state, options=opts)

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


# ============================================================================ process group
def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(world_size: int, rank: int, backend: str | None = None, *, mode: str = "ddp",
                     device: str | torch.device | None = None, port: int | None = None) -> DistContext:
    """Join the process group (env:// rendezvous on MASTER_ADDR/MASTER_PORT; 127.0.0.1 and `port` if unset).

    backend: gloo on CPU, nccl on CUDA (default from `device`, itself cuda when available). On CUDA the
    rank's device is cuda:LOCAL_RANK (or cuda:rank). Sets the context `current()` returns.
    """
    global _CURRENT
    if mode not in MODES:
        raise ValueError(f"train.parallel: unknown value {mode!r}; valid: {', '.join(MODES)}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} outside [0, world_size={world_size})")
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) if device.index is None else device.index)
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if port is None:
            raise ValueError("init_distributed: set MASTER_PORT or pass port= (the same on every rank)")
        os.environ["MASTER_PORT"] = str(port)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=TIMEOUT)
    _CURRENT = DistContext(world_size, rank, mode, device)
    return _CURRENT


def current() -> DistContext | None:
    """The context set by `init_distributed` (None in a single process)."""
    return _CURRENT


def shutdown() -> None:
    global _CURRENT
    _CURRENT = None
    if dist.is_initialized():
        dist.destroy_process_group()


# ============================================================================ wrapping
def broadcast_params(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers onto every rank, in place."""
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks FSDP2 shards one by one (Hugging Face's `_no_split_modules` classes)."""
    names = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"train.parallel=fsdp2: no decoder layers found in {type(model).__name__} "
                         "(it lists no _no_split_modules)")
    return layers


def wrap_model(model: torch.nn.Module, mode: str = "ddp", device: torch.device | None = None) -> torch.nn.Module:
    """DDP(model), or FSDP2: `fully_shard` on each decoder layer then the root (in place). Needs a process group.

    DDP broadcasts rank 0's weights; FSDP2 does too here, so every rank starts from the same model.
    """
    if not dist.is_initialized():
        raise RuntimeError("wrap_model: no process group (call init_distributed first)")
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # device_ids=None: inputs are already on the model's device; no buffers to sync (rotary tables are constant)
        return DDP(model, device_ids=None, broadcast_buffers=False)
    if mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        device = device or next(model.parameters()).device
        broadcast_params(model)
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    raise ValueError(f"train.parallel: unknown value {mode!r}; valid: {', '.join(MODES)}")


def full_value(x) -> torch.Tensor:
    """A DTensor's full value (FSDP2 grad norms, gradients); other tensors unchanged (a collective for DTensors)."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


# ============================================================================ leader / followers
@contextmanager
def lead(ctx: DistContext):
    """On rank 0: the other ranks are in `serve`; trainer calls are handed to them; 'stop' on a clean exit."""
    ctx.leader = True
    yield ctx
    dist.broadcast_object_list([("stop", ())], src=0)
    ctx.leader = False


def serve(model: torch.nn.Module, ctx: DistContext):
    """Ranks > 0: build the trainer when rank 0 does (same arguments), then run every call rank 0 shares
    until 'stop'. Returns the trainer (None if rank 0 never built one)."""
    from thinkrl.train.engine import TrainEngine

    trainer = None
    while True:
        msg: list = [None]
        dist.broadcast_object_list(msg, src=0)
        method, args = msg[0]
        if method == "stop":
            return trainer
        if method == "init":
            trainer = TrainEngine(model, *args, dist=ctx)
        elif trainer is None:
            raise RuntimeError(f"rank {ctx.rank}: rank 0 called trainer.{method} before building the trainer")
        else:
            getattr(trainer, method)(*args)


# ============================================================================ processes
def launch(fn, world_size: int, *args, start_method: str = "spawn", threads: int = 0) -> None:
    """Run fn(rank, world_size, *args) in `world_size` processes, or in this one under torchrun.

    Spawned ranks get MASTER_ADDR=127.0.0.1 and a free MASTER_PORT; `threads` > 0 sets each rank's torch
    threads. An exception in any rank raises here (the other ranks are terminated).
    """
    if world_size < 1:
        raise ValueError(f"train.world_size: must be >= 1, got {world_size}")
    if under_torchrun():
        env_ws = int(os.environ["WORLD_SIZE"])
        if env_ws != world_size:
            raise ValueError(f"train.world_size={world_size} but torchrun started WORLD_SIZE={env_ws} processes")
        _rank_main(int(os.environ["RANK"]), fn, world_size, threads, args)
        return
    import torch.multiprocessing as mp

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(free_port())
    try:
        mp.start_processes(_rank_main, args=(fn, world_size, threads, args), nprocs=world_size,
                           join=True, start_method=start_method)
    except mp.ProcessRaisedException as e:  # the rank's traceback is in the message: keep its last line
        last = str(e).strip().splitlines()[-1]
        raise RuntimeError(f"data-parallel rank {e.error_index} failed: {last}") from e
    finally:
        os.environ.pop("MASTER_PORT", None)


def _rank_main(rank: int, fn, world_size: int, threads: int, args: tuple) -> None:
    if threads > 0:
        torch.set_num_threads(threads)
    fn(rank, world_size, *args)
