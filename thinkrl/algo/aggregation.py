"""Loss aggregation modes. Each reduces per-token losses [N] of a micro-batch to a scalar using
the global counts in the LossInput, so the sum over micro-batches is the batch loss."""
from __future__ import annotations

import torch

from thinkrl.algo.registry import register_loss_agg


@register_loss_agg("token-mean")
def token_mean(per_token: torch.Tensor, inp) -> torch.Tensor:
    return (per_token * inp.mask).sum() / max(inp.num_tokens, 1.0)


@register_loss_agg("seq-mean-token-mean")
def seq_mean_token_mean(per_token: torch.Tensor, inp) -> torch.Tensor:
    # per-sequence token means need each sequence's token count; sequences are never split across
    # micro-batches, so the local count is the global one.
    ids = inp.seq_ids
    uniq, local = torch.unique(ids, return_inverse=True)
    n = torch.zeros(len(uniq), dtype=per_token.dtype, device=per_token.device).index_add_(0, local, inp.mask)
    s = torch.zeros(len(uniq), dtype=per_token.dtype, device=per_token.device).index_add_(0, local, per_token * inp.mask)
    return (s / n.clamp(min=1)).sum() / max(inp.num_seqs, 1.0)


@register_loss_agg("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(per_token: torch.Tensor, inp, norm: float | None = None) -> torch.Tensor:
    # Dr. GRPO: token sums divided by a constant (the max response length), averaged over sequences
    norm = norm or float(getattr(inp, "max_len", 0) or 1.0)
    return (per_token * inp.mask).sum() / norm / max(inp.num_seqs, 1.0)
