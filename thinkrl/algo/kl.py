"""KL estimators between the current policy and a reference, per token (Schulman's k1, k2, k3)."""
from __future__ import annotations

import torch

from thinkrl.algo.registry import register_kl


@register_kl("k1")
def k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return logp - ref_logp


@register_kl("k2")
def k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logp - ref_logp) ** 2


@register_kl("k3")
def k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    d = (ref_logp - logp).clamp(-20, 20)
    return torch.exp(d) - d - 1.0
