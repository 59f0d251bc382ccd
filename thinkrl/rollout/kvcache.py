"""Slot memory for the embedded engine: the KV cache of running sequences, their per-slot decode state, and
a prefix cache of prompts.

`SlotKVCache` holds K and V of every layer for `slots` sequences, each up to `length` positions. Both are
stored *transposed*, `[layers, slots, kv_heads, head_dim, time]`, so that decode attention is two batched
matrix products with contiguous rows (`q @ K` and `p @ V^T`) over a `[..., :T]` view: measured ~2x faster on
CPU than the usual `[time, head_dim]` layout. The tensors grow on demand (doubling) up to `max_slots` x
`max_len`, so a small workload never pays for the full budget.

`PrefixCache` keeps the KV of recent prompts (LRU, bounded in tokens) so that a request whose prompt shares a
prefix with an earlier one (the other samples of a group admitted later, a multi-turn continuation, a common
system prompt) only computes the rest. It is flushed whenever the weights change.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from thinkrl.rollout.sampling import uniforms


class SlotKVCache:
    def __init__(self, layers: int, kv_heads: int, head_dim: int, max_slots: int, max_len: int,
                 dtype: torch.dtype, device: torch.device):
        self.max_slots, self.max_len = max_slots, max_len
        shape = (layers, 0, kv_heads, head_dim, 0)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    @property
    def length(self) -> int:
        return self.k.shape[-1]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def ensure(self, slots: int, length: int) -> None:
        """Grow (by doubling, capped at the budget) so that `slots` slots of `length` positions fit."""
        if slots > self.max_slots or length > self.max_len:
            raise ValueError(f"KV cache request ({slots} slots x {length} positions) exceeds the budget "
                             f"(max_seqs={self.max_slots}, max_len={self.max_len})")
        if slots <= self.slots and length <= self.length:
            return
        new_s = max(self.slots, min(self.max_slots, max(slots, 2 * self.slots, 8)))
        new_t = max(self.length, min(self.max_len, max(length, 2 * self.length, 64)))
        L, S, H, D, T = self.k.shape
        for name in ("k", "v"):
            old = getattr(self, name)
            new = torch.zeros((L, new_s, H, D, new_t), dtype=old.dtype, device=old.device)
            new[:, :S, :, :, :T] = old
            setattr(self, name, new)

    def write(self, layer: int, slots: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v `[*idx, kv_heads, head_dim]` at positions `pos` of `slots` (index tensors broadcast to idx)."""
        self.k[layer][slots, :, :, pos] = k
        self.v[layer][slots, :, :, pos] = v

    def read(self, layer: int, slots: torch.Tensor | slice, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of `slots` up to `length`, each `[B, kv_heads, head_dim, length]` (a view for a slice)."""
        return self.k[layer][slots, ..., :length], self.v[layer][slots, ..., :length]

    def copy(self, src: int, dsts: list[int], length: int) -> None:
        """Copy the first `length` positions of slot `src` into slots `dsts` (the n samples of one prompt)."""
        if dsts:
            idx = torch.tensor(dsts, device=self.k.device)
            for t in (self.k, self.v):
                t[:, idx, ..., :length] = t[:, src:src + 1, ..., :length].clone()

    def move(self, src: torch.Tensor, dst: torch.Tensor, length: int) -> None:
        """Relocate slots (compaction): slot dst[i] receives slot src[i]'s first `length` positions."""
        for t in (self.k, self.v):
            t[:, dst, ..., :length] = t[:, src, ..., :length]

    def save(self, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[:, slot, ..., :length].clone(), self.v[:, slot, ..., :length].clone()

    def load(self, saved: tuple[torch.Tensor, torch.Tensor], slot: int, length: int) -> None:
        self.k[:, slot, ..., :length] = saved[0][..., :length]
        self.v[:, slot, ..., :length] = saved[1][..., :length]


class SlotState:
    """Per-slot decode state, on device: last sampled token, next position, tokens generated, sampling
    parameters, stop ids (rows padded with -1), the generated tokens / log-probs so far, and the sampling
    uniform of every step (`uniforms(seed, step)`, drawn once when the sequence starts: one gather per step
    instead of ~30 small integer ops)."""

    FIELDS = ("tok", "pos", "gen", "max_new", "top_k", "seed", "temp", "top_p", "active", "stop_tab",
              "out_tok", "out_lp", "u")

    def __init__(self, slots: int, max_len: int, device: torch.device):
        self.slots, self.max_len = slots, max_len
        for name in ("tok", "pos", "gen", "max_new", "top_k", "seed"):
            setattr(self, name, torch.zeros(slots, dtype=torch.long, device=device))
        self.temp, self.top_p = torch.ones(slots, device=device), torch.ones(slots, device=device)
        self.active = torch.zeros(slots, dtype=torch.bool, device=device)
        self.stop_tab = torch.full((slots, 1), -1, dtype=torch.long, device=device)
        self.out_tok = torch.zeros(slots, 0, dtype=torch.long, device=device)
        self.out_lp = torch.zeros(slots, 0, device=device)
        self.u = torch.zeros(slots, 0, dtype=torch.float64, device=device)

    def assign(self, idx: torch.Tensor, stop_ids: list[list[int]], max_new: list[int], **cols: list) -> None:
        """Start new sequences in slots `idx`; `cols` gives pos, seed, temp, top_p, top_k per sequence."""
        extra = max(map(len, stop_ids)) - self.stop_tab.shape[1]
        if extra > 0:
            self.stop_tab = torch.cat([self.stop_tab, self.stop_tab.new_full((self.slots, extra), -1)], 1)
        cap = self.out_tok.shape[1]
        if max(max_new) > cap:
            grow = (self.slots, min(self.max_len, max(max(max_new), 2 * cap, 64)) - cap)
            self.out_tok = torch.cat([self.out_tok, self.out_tok.new_zeros(grow)], 1)
            self.out_lp = torch.cat([self.out_lp, self.out_lp.new_zeros(grow)], 1)
            self.u = torch.cat([self.u, self.u.new_zeros(grow)], 1)
        width = self.stop_tab.shape[1]
        cols.update(stop_tab=[s + [-1] * (width - len(s)) for s in stop_ids], max_new=max_new,
                    gen=[0] * len(max_new), active=[True] * len(max_new))
        for name, vals in cols.items():
            t = getattr(self, name)
            t[idx] = torch.tensor(vals, dtype=t.dtype, device=t.device)
        steps = torch.arange(max(max_new), device=self.u.device)  # no sequence samples past its max_new
        self.u[idx, : len(steps)] = uniforms(self.seed[idx][:, None], steps[None])

    def clear(self, idx: torch.Tensor) -> None:
        self.active[idx] = False
        for t in (self.tok, self.pos, self.gen):
            t[idx] = 0

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        for name in self.FIELDS:
            t = getattr(self, name)
            t[dst] = t[src]
        self.active[src] = False


class PrefixCache:
    """LRU map prompt tokens -> saved KV (whatever the runner's `save` returns), bounded in tokens."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.tokens = 0
        self.hits = self.hit_tokens = 0
        self._entries: OrderedDict[tuple, tuple[np.ndarray, object]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, prompt: list[int]) -> tuple[int, object | None]:
        """Longest cached prefix of `prompt`, at most len(prompt) - 1 (the last token is always computed,
        since its logits give the first sampled token). Returns (length, saved KV) or (0, None)."""
        limit = len(prompt) - 1
        if limit <= 0 or not self._entries:
            return 0, None
        a = np.asarray(prompt[:limit])
        best, best_key = 0, None
        for key, (toks, _) in self._entries.items():
            m = min(len(toks), limit)
            diff = np.flatnonzero(a[:m] != toks[:m])
            n = int(diff[0]) if len(diff) else m
            if n > best:
                best, best_key = n, key
        if best_key is None:
            return 0, None
        self._entries.move_to_end(best_key)
        self.hits += 1
        self.hit_tokens += best
        return best, self._entries[best_key][1]

    def store(self, prompt: list[int], saved: object) -> None:
        key = tuple(prompt)
        if len(key) > self.max_tokens:
            return
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        self._entries[key] = (np.asarray(prompt), saved)
        self.tokens += len(key)
        while self.tokens > self.max_tokens:
            old, _ = self._entries.popitem(last=False)
            self.tokens -= len(old)

    def clear(self) -> None:
        self._entries.clear()
        self.tokens = 0
