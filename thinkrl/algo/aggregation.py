"""Loss aggregation modes: per-token losses [N] of one micro-batch -> a scalar.

Every mode divides by *global* quantities (LossInput.num_tokens, num_seqs, the constant length
normaliser), so summing the micro-batch results gives the loss of the whole batch however it is
split. Sequences are never split across micro-batches, so per-sequence token counts are local.

Signature: fn(per_token: Tensor[N], inp: LossInput, cfg: AlgoConfig | None = None) -> Tensor[]
"""
from __future__ import annotations

import torch

from thinkrl.algo.registry import register_loss_agg


def seq_sums(x: torch.Tensor, seq_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums of x per distinct sequence id of a micro-batch, and each token's index into them."""
    uniq, local = torch.unique(seq_ids, return_inverse=True)
    out = torch.zeros(len(uniq), dtype=x.dtype, device=x.device).index_add_(0, local, x)
    return out, local


@register_loss_agg("token-mean")
def token_mean(per_token: torch.Tensor, inp, cfg=None) -> torch.Tensor:
    """sum_t l_t / num_tokens (DAPO's token-level loss: every token of the batch weighs the same)."""
    return (per_token * inp.mask).sum() / max(float(inp.num_tokens), 1.0)


@register_loss_agg("seq-mean-token-mean")
def seq_mean_token_mean(per_token: torch.Tensor, inp, cfg=None) -> torch.Tensor:
    """1/num_seqs * sum_i (1/|o_i| sum_t l_it) (GRPO as written in DeepSeekMath)."""
    n, _ = seq_sums(inp.mask.to(per_token.dtype), inp.seq_ids)
    s, _ = seq_sums(per_token * inp.mask, inp.seq_ids)
    return (s / n.clamp(min=1)).sum() / max(float(inp.num_seqs), 1.0)


def length_norm(inp, cfg=None) -> float:
    """Dr.GRPO's constant normaliser: cfg.max_len_norm if set, else LossInput.max_len."""
    norm = float(cfg.max_len_norm if cfg is not None else 0) or float(inp.max_len)
    if norm <= 0:
        raise ValueError("loss_agg 'seq-mean-token-sum-norm' needs algo.max_len_norm > 0 or LossInput.max_len "
                         "(the batch's max response length)")
    return norm


@register_loss_agg("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(per_token: torch.Tensor, inp, cfg=None) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025): 1/num_seqs * sum_i sum_t l_it / L, with L a constant (no 1/|o_i|)."""
    return (per_token * inp.mask).sum() / length_norm(inp, cfg) / max(float(inp.num_seqs), 1.0)
