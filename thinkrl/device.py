"""Device and dtype resolution (device-agnostic code asks here, never hard-codes cuda)."""
from __future__ import annotations

import os
import platform

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """auto: cuda, else mps, else cpu. A device named explicitly must exist: cuda without a GPU fails with one
    line instead of running on the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def resolve_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def supports_bf16(device: torch.device) -> bool:
    """bf16 arithmetic on this device: CUDA from compute capability 8.0 (Ampere) on; the CPU always (emulated
    where the CPU lacks bf16 instructions: correct, slow)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type in ("cpu", "mps", "xpu")


def check_dtype(device: torch.device, dtype: str | torch.dtype, what: str = "model.dtype") -> None:
    """A dtype the device cannot compute in fails with one line (instead of falling back silently)."""
    dt = resolve_dtype(dtype) if isinstance(dtype, str) else dtype
    if dt == torch.bfloat16 and not supports_bf16(device):
        raise ValueError(f"{what}: bf16 on {device} ({device_name(device)}), which does not support it; use float32")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timings of asynchronous devices need it; a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def device_name(device: torch.device) -> str:
    """A human name of the hardware: the GPU's name on CUDA, the processor on the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or "cpu"
    return device.type


def deterministic_kernels(device: torch.device) -> None:
    """run.deterministic on CUDA: torch's deterministic algorithms (cuBLAS with a fixed workspace, no atomics in
    backward passes such as the embedding's) in warn-only mode: an op without a deterministic implementation warns
    instead of failing the run (SDPA's memory-efficient backward is one that then stays nondeterministic;
    tests/gpu checks whether runs repeat). The CPU's kernels already repeat."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


def set_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)
