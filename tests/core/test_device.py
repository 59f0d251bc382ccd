"""thinkrl.device: a named device must exist, bf16 only where the device computes it, names and synchronisation."""
from __future__ import annotations

import pytest
import torch

from thinkrl.device import check_dtype, device_name, resolve_device, supports_bf16, synchronize


def test_a_named_cuda_device_must_exist(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device 'cuda': CUDA is not available"):
        resolve_device("cuda")
    assert resolve_device("auto").type in ("cpu", "mps")
    assert resolve_device("cpu") == torch.device("cpu")


def test_a_cuda_index_beyond_the_devices_fails(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match="has 1 CUDA device"):
        resolve_device("cuda:1")


def test_bf16_refused_on_a_gpu_without_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla V100")
    cuda = torch.device("cuda")
    assert not supports_bf16(cuda)
    with pytest.raises(ValueError, match=r"model.autocast_bf16: bf16 on cuda \(Tesla V100\)"):
        check_dtype(cuda, torch.bfloat16, "model.autocast_bf16")
    check_dtype(cuda, "float32")  # fp32 is always fine
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    check_dtype(cuda, "bfloat16")


def test_the_cpu_computes_bf16_and_has_a_name():
    cpu = torch.device("cpu")
    assert supports_bf16(cpu)
    check_dtype(cpu, "bfloat16")
    assert device_name(cpu)
    synchronize(cpu)  # a no-op, not an error
