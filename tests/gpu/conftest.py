"""The `gpu` tests (`pytest -m gpu tests/gpu`, or `make gpu-check`): the same code on a CUDA device.

They are deselected by the default `-m 'not ... gpu ...'`; run without CUDA they skip with the reason, unless
THINKRL_GPU_TESTS_ON_CPU=1 runs them on the CPU (to check the tests themselves where no GPU is lent).
With THINKRL_GPU_REPORT=DIR each test also writes the figures it measured to DIR/<name>.json.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

SKIP_REASON = "needs a CUDA device (THINKRL_GPU_TESTS_ON_CPU=1 runs the gpu tests on the CPU)"


@pytest.fixture(scope="session")
def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("THINKRL_GPU_TESTS_ON_CPU") == "1":
        return torch.device("cpu")
    pytest.skip(SKIP_REASON)


@pytest.fixture(scope="session")
def report():
    """report(name, figures): print the figures (pytest -s shows them) and keep them under THINKRL_GPU_REPORT."""
    out = os.environ.get("THINKRL_GPU_REPORT")

    def write(name: str, figures: dict) -> None:
        print(f"\n[gpu figures] {name}: {json.dumps(figures)}")
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / f"{name}.json").write_text(json.dumps(figures, indent=2))

    return write



@pytest.fixture(scope="session")
def need_bf16(device):
    """need_bf16(): skip the calling test where the device cannot compute in bf16."""
    from thinkrl.device import supports_bf16

    def check() -> None:
        if not supports_bf16(device):
            pytest.skip(f"{device} does not support bf16")

    return check
