"""Micro-batch allocation: the fewest micro-batches under a token budget, with balanced compute.

Items (sequences, or shared-prompt groups) have a size in stream tokens and a cost (compute). We
  1. count bins with first-fit-decreasing on sizes (the fewest micro-batches we know how to fill),
     rounded up to a multiple of the data-parallel world size (every rank runs the same count);
  2. split the items into that many parts of balanced cost with Karmarkar-Karp (largest differencing);
     its spread (max - min part cost) is at most the largest item cost. If a part overflows the budget
     we fall back to a capacity-aware greedy, then to the first-fit-decreasing bins themselves;
  3. deal the micro-batches to ranks in rounds (largest first, to the rank with least work so far):
     rank totals then differ by at most the largest micro-batch cost, and the j-th micro-batches of all
     ranks have similar cost (ranks run them in lockstep).
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Cost:
    """cost = linear * tokens + quadratic * attended (query, key) pairs.

    Per layer a token costs ~24·d² FLOPs in the matmuls and each attended pair ~4·d, so
    quadratic/linear ≈ 1/(6·d) for hidden size d: `Cost.for_hidden(d)`. The default assumes d = 1024.
    """

    linear: float = 1.0
    quadratic: float = 1.0 / 6144

    @classmethod
    def for_hidden(cls, hidden_size: int) -> "Cost":
        return cls(1.0, 1.0 / (6 * hidden_size))

    def __call__(self, tokens: int, pairs: int) -> float:
        return self.linear * tokens + self.quadratic * pairs

    def of_length(self, n: int) -> float:
        """Cost of one causal sequence of n tokens (n(n+1)/2 attended pairs)."""
        return self(n, n * (n + 1) // 2)


def first_fit_decreasing(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices, each with total size <= capacity (items must each fit)."""
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, r in enumerate(room):
            if sizes[i] <= r:
                bins[b].append(i)
                room[b] -= sizes[i]
                break
        else:
            bins.append([i])
            room.append(capacity - sizes[i])
    return bins


def karmarkar_karp(costs: Sequence[float], k: int) -> list[list[int]]:
    """Split item indices into k parts of balanced total cost (multiway largest differencing method).

    Each step merges the two partial partitions with the largest spreads, pairing the heaviest subsets of
    one with the lightest of the other; the final spread is at most max(costs).
    """
    if k < 1:
        raise ValueError(f"karmarkar_karp: k must be >= 1, got {k}")
    heap = []  # (-spread, tie, [(sum, items)] sorted ascending by sum)
    for i, c in enumerate(costs):
        part = [(0.0, [])] * (k - 1) + [(float(c), [i])]
        heapq.heappush(heap, (-float(c), i, part))
    if not heap:
        return [[] for _ in range(k)]
    tie = len(costs)
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        merged = sorted(((sa + sb, ia + ib) for (sa, ia), (sb, ib) in zip(a, reversed(b))), key=lambda p: p[0])
        heapq.heappush(heap, (-(merged[-1][0] - merged[0][0]), tie, merged))
        tie += 1
    return [sorted(items) for _, items in heap[0][2]]


def _greedy_fit(sizes, costs, capacity: int, k: int) -> list[list[int]] | None:
    """Largest size first into the least-cost part that has room; None if some item fits nowhere."""
    parts: list[list[int]] = [[] for _ in range(k)]
    load, work = [0] * k, [0.0] * k
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        fits = [p for p in range(k) if load[p] + sizes[i] <= capacity]
        if not fits:
            return None
        p = min(fits, key=lambda p: (work[p], p))
        parts[p].append(i)
        load[p] += sizes[i]
        work[p] += costs[i]
    return parts


def _ffd_k(sizes, capacity: int, k: int) -> list[list[int]]:
    """First-fit-decreasing bins, split until there are exactly k non-empty parts (needs len(sizes) >= k)."""
    parts = first_fit_decreasing(sizes, capacity)
    while len(parts) < k:
        donor = max(parts, key=len)
        parts.append([donor.pop()])
    return parts


def allocate(sizes: Sequence[int], capacity: int, costs: Sequence[float] | None = None,
             world_size: int = 1) -> list[list[list[int]]]:
    """Item indices per rank per micro-batch: result[rank][mb] -> items, same micro-batch count on every rank.

    sizes: tokens each item adds to a micro-batch's stream; costs: compute per item (default: sizes).
    """
    if capacity < 1:
        raise ValueError(f"max_tokens_per_mb must be >= 1, got {capacity}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    for i, s in enumerate(sizes):
        if s > capacity:
            raise ValueError(f"sequence {i} has {s} tokens, more than max_tokens_per_mb={capacity}")
        if s < 1:
            raise ValueError(f"sequence {i} is empty (0 tokens)")
    costs = [float(s) for s in sizes] if costs is None else [float(c) for c in costs]
    if len(costs) != len(sizes):
        raise ValueError(f"allocate: {len(sizes)} sizes but {len(costs)} costs")
    n = len(sizes)
    if n == 0:
        raise ValueError("allocate: no sequences")
    if n < world_size:
        raise ValueError(f"need at least world_size={world_size} sequences to give every rank a micro-batch, got {n}")
    k_ffd = len(first_fit_decreasing(sizes, capacity))
    k = math.ceil(k_ffd / world_size) * world_size
    if k > n:
        raise ValueError(f"{n} sequences cannot fill {k} micro-batches ({k_ffd} under max_tokens_per_mb={capacity}, "
                         f"rounded up to a multiple of world_size={world_size}): raise max_tokens_per_mb")

    def ok(parts):
        return parts is not None and all(p and sum(sizes[i] for i in p) <= capacity for p in parts)

    parts = karmarkar_karp(costs, k)
    if not ok(parts):
        parts = _greedy_fit(sizes, costs, capacity, k)
        if not ok(parts):
            parts = _ffd_k(sizes, capacity, k)

    # Deal to ranks in rounds, heaviest micro-batches first, each to the rank with the least work so far.
    parts.sort(key=lambda p: (-sum(costs[i] for i in p), p))
    ranks: list[list[list[int]]] = [[] for _ in range(world_size)]
    work = [0.0] * world_size
    for r0 in range(0, k, world_size):
        for part, r in zip(parts[r0:r0 + world_size], sorted(range(world_size), key=lambda r: (work[r], r))):
            ranks[r].append(part)
            work[r] += sum(costs[i] for i in part)
    return ranks
