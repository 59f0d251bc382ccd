"""Policy losses.

Every loss takes a `LossInput` (flat per-token tensors of one micro-batch, plus the *global*
token/sequence counts of the whole batch so that summing micro-batch losses gives the batch loss
whatever the split) and the AlgoConfig, and returns (loss, metrics).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from thinkrl.algo.registry import get_loss_agg, register_loss


@dataclass
class LossInput:
    logp: torch.Tensor  # [N] current policy log-probs (requires grad)
    old_logp: torch.Tensor  # [N] log-probs the ratio is taken against (old / proximal policy)
    advantages: torch.Tensor  # [N]
    mask: torch.Tensor  # [N] float, 1 on loss tokens
    seq_ids: torch.Tensor  # [N] long, global index of the sequence of each token
    num_tokens: float  # loss tokens in the whole batch (all micro-batches, all ranks)
    num_seqs: float  # sequences in the whole batch
    behav_logp: torch.Tensor | None = None  # [N] inference engine's log-probs (behaviour policy)
    ref_logp: torch.Tensor | None = None  # [N] reference policy (KL)
    entropy: torch.Tensor | None = None  # [N] per-token entropy of the current policy


def masked_max(x: torch.Tensor, mask: torch.Tensor) -> float:
    if mask.sum() == 0:
        return 0.0
    return float(x.detach()[mask > 0].max())


@register_loss("ppo")
def ppo(inp: LossInput, cfg):
    """PPO clip with separate clip_low / clip_high (clip-higher) and optional dual clip."""
    log_ratio = (inp.logp - inp.old_logp).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    adv = inp.advantages
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    per_token = torch.maximum(pg1, pg2)
    clipped = (pg2 > pg1).float()
    if cfg.dual_clip and cfg.dual_clip > 1:
        bound = -adv * cfg.dual_clip
        dual = torch.where(adv < 0, torch.minimum(per_token, bound), per_token)
        clipped = torch.where((adv < 0) & (dual < per_token), torch.ones_like(clipped), clipped)
        per_token = dual
    agg = get_loss_agg(cfg.loss_agg)
    loss = agg(per_token, inp)
    m = inp.mask
    metrics = {
        "clip/frac": float((clipped * m).sum()),  # summed; the trainer divides by num_tokens
        "is/ratio_max": masked_max(ratio, m),
    }
    return loss, metrics
