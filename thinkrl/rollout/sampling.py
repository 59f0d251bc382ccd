"""Sampling for the embedded engine, on device and vectorised over rows; reproducible per sequence: each row's
randomness is a counter-based uniform, a pure function of (seed, step)."""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32), without int64 overflow."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniforms(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One uniform in [0, 1) (48 random bits) per row, a pure function of (seed, step)."""
    h = _hash32((_hash32(seeds & _M32) + _mul32(steps & _M32, 0x9E3779B9)) & _M32)
    lo = _hash32(h ^ 0x5BD1E995)
    return ((h >> 8).double() + (lo >> 8).double() / float(1 << 24)) / float(1 << 24)


def sample(logits: torch.Tensor, temp: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor, u: torch.Tensor,
           filtered: bool, plain: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of fp32 `logits [B, V]`; returns (tokens, log-probs at temperature 1).

    temp == 0 is greedy. Top-k (0: off) and top-p act on the temperature-scaled distribution. Sampling is
    inverse-CDF in vocabulary order with the row's uniform `u` in [0, 1) (the engine draws
    `uniforms(seed, step)`), so a row's token depends only on its own logits, parameters and uniform (never on
    the other rows). `filtered=False` (no row uses top-k/top-p) skips the sort that builds the filter mask;
    `plain=True` (every row at temperature 1) skips the greedy and temperature ops."""
    logp = torch.log_softmax(logits, -1)
    if plain:
        probs = logp.exp()
    else:
        probs = torch.softmax(logits / torch.where(temp > 0, temp, 1.0)[:, None], -1)
    if filtered:
        sp, order = probs.sort(dim=-1, descending=True, stable=True)
        rank = torch.arange(sp.shape[1], device=sp.device)
        drop = (top_k[:, None] > 0) & (rank[None] >= top_k[:, None])
        drop |= (top_p[:, None] < 1) & ((sp.cumsum(-1) - sp) > top_p[:, None])  # mass before it > top_p
        probs = probs.masked_fill(torch.zeros_like(drop).scatter_(1, order, drop), 0.0)
    cdf = probs.double().cumsum(-1)
    drawn = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_max_(cdf.shape[1] - 1)[:, 0]
    tok = drawn if plain else torch.where(temp == 0, logits.argmax(-1), drawn)
    return tok, logp.gather(1, tok[:, None])[:, 0]
