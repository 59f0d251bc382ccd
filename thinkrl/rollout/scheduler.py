"""Which sequences of the embedded engine run: a FIFO of waiting sequences, the running ones by KV slot, the
free slots (lowest first, so running sequences stay packed at the low end of the slot range).

Admission is continuous batching under three budgets: `max_seqs` slots, `max_tokens` KV positions reserved
(prompt + max_new_tokens of every running sequence; a sequence that does not fit waits) and, per step,
`max_prefill_tokens` prompt tokens of new requests (the n samples of a request are admitted together and
share one prefill). When nothing waits and the running sequences leave more holes than they fill, they are
compacted into slots [0, n) so that decode batches stop paying for the holes.
"""
from __future__ import annotations

import heapq
from collections import deque

from thinkrl.rollout.sequence import Request, Sequence


class Scheduler:
    def __init__(self, max_seqs: int, max_tokens: int, max_prefill_tokens: int):
        self.max_seqs, self.max_tokens, self.max_prefill_tokens = max_seqs, max_tokens, max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # slot -> sequence
        self.free = list(range(max_seqs))  # a heap
        self.reserved = 0
        # running sequences that sample with top-k/top-p, at a temperature other than 1, with stop strings:
        # a batch without any skips the matching work
        self.n_filtered = self.n_scaled = self.n_stopstr = 0
        self.peak_running = self.compactions = 0
        self.cancel_pending = False

    def add(self, reqs: list[Request]) -> None:
        for req in reqs:
            self.waiting.extend(req.seqs)

    def cancel(self, req: Request) -> None:
        """Drop a request's waiting sequences now; its running ones leave at the start of the next step."""
        req.cancelled = self.cancel_pending = True
        self.waiting = deque(s for s in self.waiting if s.req is not req)

    def cancelled(self) -> list[Sequence]:
        """Running sequences of cancelled requests (to release)."""
        if not self.cancel_pending:
            return []
        self.cancel_pending = False
        return [s for s in self.running.values() if s.req.cancelled]

    def schedule(self, ticks: int, version: int) -> list[Sequence]:
        """Admit waiting sequences into free slots, within the budgets. They start at position len(prompt)
        with the weights of `version` (t0 = len(prompt) - ticks, where `ticks` counts the decode steps run)."""
        out, new_reqs, budget = [], set(), self.max_prefill_tokens
        while self.waiting and self.free:
            seq = self.waiting[0]
            if self.running and self.reserved + seq.req.need > self.max_tokens:
                break
            if seq.req not in new_reqs:
                if new_reqs and len(seq.req.prompt) > budget:
                    break
                new_reqs.add(seq.req)
                budget -= len(seq.req.prompt)
            self.waiting.popleft()
            seq.slot = heapq.heappop(self.free)
            self.reserved += seq.req.need
            self.running[seq.slot] = seq
            seq.start(len(seq.req.prompt) - ticks, version)
            self._count(seq, 1)
            out.append(seq)
        self.peak_running = max(self.peak_running, len(self.running))
        return out

    def release(self, seqs: list[Sequence]) -> None:
        for s in seqs:
            del self.running[s.slot]
            heapq.heappush(self.free, s.slot)
            self.reserved -= s.req.need
            self._count(s, -1)
            s.slot = -1

    def _count(self, s: Sequence, d: int) -> None:
        self.n_filtered += d * s.filtered
        self.n_scaled += d * s.scaled
        self.n_stopstr += d * (s.text is not None)

    def length(self, ticks: int) -> int:
        """Positions every running sequence has (KV entries so far)."""
        return max(s.t0 for s in self.running.values()) + ticks

    def should_compact(self, hi: int) -> bool:
        """Nothing waits and the decode batch [0, hi) is mostly holes."""
        return not self.waiting and bool(self.running) and hi > max(2 * len(self.running), 8)

    def compaction(self) -> tuple[list[int], list[int]]:
        """(slots to move, slots to move them to): the running sequences at or above n go to the holes below n."""
        n = len(self.running)
        self.compactions += 1
        return sorted(s for s in self.running if s >= n), [s for s in range(n) if s not in self.running]

    def relocate(self, movers: list[int], holes: list[int]) -> None:
        for a, b in zip(movers, holes):
            seq = self.running.pop(a)
            seq.slot = b
            self.running[b] = seq
        self.free = sorted(set(range(self.max_seqs)) - set(self.running))

    def drain(self) -> list[Sequence]:
        """Every running, then every waiting sequence; the waiting queue is emptied."""
        waiting, self.waiting = list(self.waiting), deque()
        return list(self.running.values()) + waiting
