"""The device side of the embedded engine: the model (forward.LeanRunner, or forward.HFRunner for models the
lean forward does not cover) with its slot KV cache, the per-slot decode state (kvcache.SlotState), the prefix
cache, and sampling. `prefill` and `decode` run the model and sample; both return what the engine's
postprocess needs: the slots, their new tokens, and which of them ended (slot -> 1 for a stop token, 0 for
the length limit). `score` gives teacher-forced log-probs of whole sequences."""
from __future__ import annotations

import logging

import torch

from thinkrl.rollout.forward import HFRunner, LeanRunner, lean_unsupported
from thinkrl.rollout.kvcache import PrefixCache, SlotState
from thinkrl.rollout.sampling import sample
from thinkrl.rollout.sequence import Request, Sequence

log = logging.getLogger(__name__)
Sampled = tuple[torch.Tensor, torch.Tensor, dict[int, int]]  # (slots, tokens, ended)


class ModelRunner:
    def __init__(self, model, max_seqs: int, max_len: int, dtype: torch.dtype, device: torch.device,
                 forward: str = "auto", linear: str = "auto", prefix_cache_tokens: int = 65536,
                 max_prefill_tokens: int = 8192):
        if forward not in ("auto", "lean", "hf"):
            raise ValueError(f"EmbeddedEngine: forward must be 'auto', 'lean' or 'hf', got {forward!r}")
        reason = lean_unsupported(model)
        if forward == "auto" and reason:
            log.warning("EmbeddedEngine: using the slow Hugging Face fallback forward: %s", reason)
        if forward == "hf" or (forward == "auto" and reason):
            self.model = HFRunner(model, max_seqs, max_len, dtype, device)
        else:
            self.model = LeanRunner(model, max_seqs, max_len, dtype, device, linear=linear)
        self.device, self.max_prefill_tokens = device, max_prefill_tokens
        self.vocab_size = self.model.vocab_size
        self.prefix = PrefixCache(prefix_cache_tokens)
        self.st = SlotState(max_seqs, max_len, device)  # per-slot state, on device
        self._ar = torch.arange(max_seqs, device=device)
        self.ticks = 0  # decode steps run
        self.top_n: dict[int, int] = {}  # slot -> N, for sequences that asked for top-N alternatives
        self.top: dict[int, list[list[tuple[int, float]]]] = {}  # slot -> per generated token, its top-N

    @property
    def kv_bytes(self) -> int:
        return self.model.kv_bytes

    def load_state_dict(self, sd) -> None:
        """New weights, copied in place; the prefix cache (KV of the old weights) is flushed."""
        self.model.load_state_dict(sd)
        self.prefix.clear()

    # ------------------------------------------------------------------ run
    def prefill(self, seqs: list[Sequence], filtered: bool, plain: bool) -> Sampled:
        """Compute the prompts of newly admitted sequences and sample their first token. The n samples of a
        request share one prefill, whose KV is copied to their n slots; a prompt that extends a cached one
        computes only the rest; prompts are batched in chunks of at most max_prefill_tokens padded tokens."""
        groups: dict[Request, list[Sequence]] = {}
        for s in seqs:
            groups.setdefault(s.req, []).append(s)
        self.model.ensure(max(s.slot for s in seqs) + 1, max(s.req.need for s in seqs))  # no regrowth later
        jobs = []  # (suffix length, request, leader slot, start)
        for req, ss in groups.items():
            hit, saved = self.prefix.lookup(req.prompt)
            if hit:
                self.model.load(saved, ss[0].slot, hit)
            jobs.append((len(req.prompt) - hit, req, ss[0].slot, hit))
        jobs.sort(key=lambda j: j[0])
        rows: dict[Request, torch.Tensor] = {}
        i = 0
        while i < len(jobs):
            j = i + 1
            while j < len(jobs) and (j + 1 - i) * jobs[j][0] <= self.max_prefill_tokens:
                j += 1
            chunk = jobs[i:j]
            logits = self.model.extend([c[2] for c in chunk], [c[1].prompt[c[3]:] for c in chunk],
                                       [c[3] for c in chunk])
            rows.update({c[1]: logits[k] for k, c in enumerate(chunk)})
            i = j
        for req, ss in groups.items():
            P = len(req.prompt)
            self.model.copy(ss[0].slot, [s.slot for s in ss[1:]], P)
            if self.prefix.max_tokens > 0:
                self.prefix.store(req.prompt, self.model.save(ss[0].slot, P))
        idx = torch.tensor([s.slot for s in seqs], device=self.device)
        ps = [s.req.params for s in seqs]
        self.st.assign(idx, [s.req.stop_ids for s in seqs], [p.max_new_tokens for p in ps],
                       pos=[len(s.req.prompt) for s in seqs], seed=[s.seed for s in seqs],
                       temp=[p.temperature for p in ps], top_p=[p.top_p for p in ps], top_k=[p.top_k for p in ps])
        for s in seqs:
            if s.req.params.top_logprobs > 0:
                self.top_n[s.slot], self.top[s.slot] = s.req.params.top_logprobs, []
        return self._sample(idx, torch.stack([rows[s.req] for s in seqs]), filtered, plain)

    def decode(self, hi: int, length: int, filtered: bool, plain: bool) -> Sampled:
        """One token for every active slot in [0, hi); `length` bounds every position + 1."""
        st, active = self.st, self.st.active[:hi]
        logits = self.model.decode(hi, st.tok[:hi], st.pos[:hi], length)
        st.pos[:hi] += active
        self.ticks += 1
        return self._sample(self._ar[:hi], logits, filtered, plain, active, rows=slice(0, hi))

    def _sample(self, idx: torch.Tensor, logits: torch.Tensor, filtered: bool, plain: bool,
                active: torch.Tensor | None = None, rows: slice | None = None) -> Sampled:
        """Sample the next token of slots `idx` (`rows`: the same as a slice, to read state without gathers)
        and record it; a sequence ends on a stop token or at max_new_tokens."""
        st, r = self.st, idx if rows is None else rows
        g = st.gen[r]
        tok, lp = sample(logits, st.temp[r], st.top_p[r], st.top_k[r], st.u[r].gather(1, g[:, None])[:, 0],
                         filtered, plain=plain)
        st.out_tok[idx, g], st.out_lp[idx, g], st.tok[r] = tok, lp, tok
        if self.top_n:
            self._record_top(idx, logits, active)
        g = g + (1 if active is None else active)
        st.gen[r] = g
        stop = (st.stop_tab[r] == tok[:, None]).any(1)
        fin = stop | (g >= st.max_new[r])
        if active is not None:
            fin &= active
        end = fin.nonzero()[:, 0]
        return idx, tok, dict(zip(*torch.stack([idx[end], stop[end].long()]).tolist()))

    def _record_top(self, idx: torch.Tensor, logits: torch.Tensor, active: torch.Tensor | None) -> None:
        """The N most likely tokens (log-probs at temperature 1) of the rows whose sequences asked for them:
        computed only for those rows, only while one is running."""
        slots = idx.tolist()
        act = active.tolist() if active is not None else [True] * len(slots)
        rows = [i for i, s in enumerate(slots) if s in self.top_n and act[i]]
        if not rows:
            return
        k = min(max(self.top_n[slots[i]] for i in rows), logits.shape[-1])
        vals, ids = torch.log_softmax(logits[torch.tensor(rows, device=logits.device)].float(), -1).topk(k, -1)
        for i, v, t in zip(rows, vals.tolist(), ids.tolist()):
            n = self.top_n[slots[i]]
            self.top[slots[i]].append(list(zip(t[:n], v[:n])))

    def score(self, seqs: list[list[int]]) -> list[list[float]]:
        """Per sequence, [0.0] + log p(seq[t] | seq[:t]) for t >= 1 (fp32 log_softmax of the raw logits), in
        chunks of at most max_prefill_tokens padded tokens (a longer sequence alone). Slots, KV and decode state
        are untouched."""
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out: list[list[float]] = [[] for _ in seqs]
        i = 0
        while i < len(order):
            j = i + 1
            while j < len(order) and (j + 1 - i) * len(seqs[order[j]]) <= self.max_prefill_tokens:
                j += 1
            chunk = order[i:j]
            for k, lp in zip(chunk, self.model.score([seqs[k] for k in chunk])):
                out[k] = [0.0] + lp.tolist()
            i = j
        return out

    # ------------------------------------------------------------------ slots
    def generated(self) -> list[int]:
        """Tokens generated so far, per slot."""
        return self.st.gen.tolist()

    def output(self, slot: int, n: int) -> tuple[list[int], list[float]]:
        """The first n generated tokens of `slot` and their log-probs."""
        return self.st.out_tok[slot, :n].tolist(), self.st.out_lp[slot, :n].tolist()

    def latest(self, slots: list[int]) -> list[tuple[int, float, list | None]]:
        """The token each of `slots` sampled last, its log-prob and its top-N (None: not asked for)."""
        idx = torch.tensor(slots, device=self.device)
        g = self.st.gen[idx] - 1
        toks, lps = self.st.out_tok[idx, g].tolist(), self.st.out_lp[idx, g].tolist()
        return [(t, lp, self.top[s][-1] if s in self.top_n else None) for s, t, lp in zip(slots, toks, lps)]

    def top_output(self, slot: int, n: int) -> list[list[tuple[int, float]]] | None:
        """The top-N alternatives of the first n generated tokens of `slot` (None: not asked for)."""
        return self.top[slot][:n] if slot in self.top_n else None

    def clear(self, slots: list[int]) -> None:
        for s in slots:
            self.top_n.pop(s, None), self.top.pop(s, None)
        self.st.clear(torch.tensor(slots, device=self.device))

    def move(self, movers: list[int], holes: list[int], length: int) -> None:
        """Slot holes[i] receives slot movers[i]'s first `length` KV positions and its decode state."""
        src, dst = (torch.tensor(x, dtype=torch.long, device=self.device) for x in (movers, holes))
        self.model.move(src, dst, length)
        self.st.move(src, dst)
        moved = {h: (self.top_n.pop(m), self.top.pop(m)) for m, h in zip(movers, holes) if m in self.top_n}
        for h, (n, top) in moved.items():
            self.top_n[h], self.top[h] = n, top
