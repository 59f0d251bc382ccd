"""Padding-free packed training forward: 1-D packing, shared-prompt packing, per-sequence log-probs.

A micro-batch is ONE token stream ([1, L]): its sequences concatenated, position ids restarting per
sequence, attention confined to each sequence (see `attention.py`). With `share_prompt=True` the n
responses of a group (same group id, identical prompt prefix) share one copy of the prompt:

    stream    [ prompt | resp_1 | resp_2 | ... ]
    positions  0..P-1   P..      P..          (each response continues after the prompt)
    attention  causal   prompt + itself (causal), never another response

Log-probs of every sequence are returned in full (prompt positions included). With a shared prompt the
prompt log-probs are computed once and handed to every response of the group (they are identical: the
prompt attends only to itself), so their gradient flows once; losses mask prompt tokens anyway.

    mbs = make_micro_batches(trajs, max_tokens_per_mb=4096, share_prompt=True)
    for mb in mbs:
        lps = forward_logprobs(model, mb)     # lps[j]: [len(trajs[mb.seq_index[j]].tokens)]
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from thinkrl.train.allocate import Cost, allocate, first_fit_decreasing
from thinkrl.train.attention import Spans, enable_packed_attention, packed_forward

ENTROPY_CHUNK = 2048  # rows of logits per softmax chunk when computing entropy


@dataclass
class Seq:
    """A sequence to train on; `Trajectory` works too (its group_id is the group)."""

    tokens: list[int]
    prompt_len: int = 0
    group: str | None = None


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [1, L] long
    position_ids: torch.Tensor  # [1, L] long
    prev_index: torch.Tensor  # [L] long: stream index whose logits predict token j; -1 at sequence starts
    token_index: torch.Tensor  # stream index of every token of every held sequence, concatenated
    seq_lens: list[int]  # len(tokens) of each held sequence
    seq_index: list[int]  # which input sequences it holds, in order
    spans: Spans  # attention layout

    @property
    def num_tokens(self) -> int:
        """Tokens in the stream (what the model computes)."""
        return self.input_ids.shape[1]

    @property
    def num_seq_tokens(self) -> int:
        """Tokens of the held sequences, unshared (num_seq_tokens - num_tokens = tokens saved)."""
        return sum(self.seq_lens)

    def to(self, device) -> "MicroBatch":
        return replace(self, **{f: getattr(self, f).to(device)
                                for f in ("input_ids", "position_ids", "prev_index", "token_index")})


@dataclass
class _Unit:
    """What the allocator places: one sequence, or a prompt shared by several responses."""

    members: list[int]
    prompt_len: int  # 0: a plain sequence
    size: int  # stream tokens
    pairs: int  # attended (query, key) pairs


def _fields(s) -> tuple[list[int], int, str | None]:
    group = getattr(s, "group", None)
    if group is None:
        group = getattr(s, "group_id", None)
    return list(s.tokens), int(getattr(s, "prompt_len", 0) or 0), group


def _plain(i: int, n: int) -> _Unit:
    return _Unit([i], 0, n, n * (n + 1) // 2)


def _shared(members: list[int], p: int, lens: list[int]) -> _Unit:
    rs = [lens[i] - p for i in members]
    pairs = p * (p + 1) // 2 + sum(r * p + r * (r + 1) // 2 for r in rs)
    return _Unit(members, p, p + sum(rs), pairs)


def _units(seqs: list[tuple[list[int], int, str | None]], budget: int, share_prompt: bool) -> list[_Unit]:
    lens = [len(t) for t, _, _ in seqs]
    for i, (t, p, _) in enumerate(seqs):
        if not t:
            raise ValueError(f"sequence {i} is empty (0 tokens)")
        if not 0 <= p <= len(t):
            raise ValueError(f"sequence {i}: prompt_len={p} outside [0, {len(t)}]")
        if len(t) > budget:
            raise ValueError(f"sequence {i} has {len(t)} tokens, more than max_tokens_per_mb={budget}")
    if not share_prompt:
        return [_plain(i, n) for i, n in enumerate(lens)]
    groups: dict[tuple, list[int]] = {}  # (group, prompt tokens) -> members, in first-seen order
    units: list[_Unit] = []
    for i, (t, p, g) in enumerate(seqs):
        if p > 0 and g is not None:
            groups.setdefault((g, tuple(t[:p])), []).append(i)
        else:
            units.append(_plain(i, lens[i]))
    for (_, prompt), members in groups.items():
        p = len(prompt)
        if p + sum(lens[i] - p for i in members) <= budget:
            chunks = [members]
        else:  # too big for one micro-batch: several copies of the prompt, responses first-fit
            bins = first_fit_decreasing([lens[i] - p for i in members], budget - p)
            chunks = [sorted(members[j] for j in b) for b in bins]
        units += [_shared(c, p, lens) if len(c) > 1 else _plain(c[0], lens[c[0]]) for c in chunks]
    return units


def _build(seqs, units: list[_Unit]) -> MicroBatch:
    ids, pos, prev, tok_idx, bounds, seq_lens, seq_index = [], [], [], [], [], [], []
    cur = 0
    for u in units:
        if u.prompt_len == 0:
            (i,) = u.members
            t = seqs[i][0]
            n = len(t)
            ids += t
            pos += range(n)
            prev += [-1, *range(cur, cur + n - 1)]
            tok_idx += range(cur, cur + n)
            bounds.append((cur, cur + n, cur, cur))
            seq_lens.append(n)
            seq_index.append(i)
            cur += n
            continue
        p, a = u.prompt_len, cur
        ids += seqs[u.members[0]][0][:p]
        pos += range(p)
        prev += [-1, *range(a, a + p - 1)]
        bounds.append((a, a + p, a, a))
        cur += p
        for i in u.members:
            r = seqs[i][0][p:]
            if r:
                ids += r
                pos += range(p, p + len(r))
                prev += [a + p - 1, *range(cur, cur + len(r) - 1)]
                bounds.append((cur, cur + len(r), a, a + p))
            tok_idx += [*range(a, a + p), *range(cur, cur + len(r))]
            seq_lens.append(p + len(r))
            seq_index.append(i)
            cur += len(r)
    long = torch.long
    return MicroBatch(torch.tensor([ids], dtype=long), torch.tensor([pos], dtype=long),
                      torch.tensor(prev, dtype=long), torch.tensor(tok_idx, dtype=long),
                      seq_lens, seq_index, Spans(bounds))


def make_micro_batches(seqs, max_tokens_per_mb: int, *, share_prompt: bool = False, world_size: int = 1,
                       rank: int = 0, cost: Cost | None = None) -> list[MicroBatch]:
    """This rank's packed micro-batches for `seqs` (Seq or Trajectory objects; every rank passes the same list).

    Uses the fewest micro-batches whose streams fit `max_tokens_per_mb`, balanced by `cost` within and
    across ranks; every rank gets the same number. A sequence longer than the budget is a ValueError.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} outside [0, world_size={world_size})")
    fields = [_fields(s) for s in seqs]
    units = _units(fields, max_tokens_per_mb, share_prompt)
    cost = cost or Cost()
    plan = allocate([u.size for u in units], max_tokens_per_mb, [cost(u.size, u.pairs) for u in units],
                    world_size=world_size)
    return [_build(fields, [units[j] for j in part]) for part in plan[rank]]


def packing_stats(mbs: list[MicroBatch], max_tokens_per_mb: int) -> dict[str, float]:
    """Stream tokens, tokens saved by prompt sharing, and budget left unused (padding-equivalent waste)."""
    stream = sum(mb.num_tokens for mb in mbs)
    seq = sum(mb.num_seq_tokens for mb in mbs)
    return {"pack/micro_batches": float(len(mbs)), "pack/stream_tokens": float(stream),
            "pack/tokens_saved": float(seq - stream),
            "pack/budget_unused_frac": 1.0 - stream / max(1, len(mbs) * max_tokens_per_mb)}


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, prev_index: torch.Tensor,
                   with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [L, V], input_ids [L] -> (logprob [L], entropy [L] or None), in fp32.

    logprob[j] = log p(input_ids[j] | logits[prev_index[j]]) and 0 where prev_index < 0. No [L, V]
    log-softmax is materialised: logprob = logit[target] - logsumexp(logits).
    """
    logits = logits.float()
    valid = prev_index >= 0
    src = prev_index.clamp(min=0)
    lse = torch.logsumexp(logits, dim=-1)
    lp = torch.where(valid, logits[src, input_ids] - lse[src], 0.0)
    if not with_entropy:
        return lp, None
    ent_rows = torch.cat([
        lse[i:i + ENTROPY_CHUNK] - (torch.softmax(c, dim=-1) * c).sum(-1)
        for i, c in zip(range(0, logits.shape[0], ENTROPY_CHUNK), logits.split(ENTROPY_CHUNK))
    ])
    return lp, torch.where(valid, ent_rows[src], 0.0)


def forward_logprobs(model, mb: MicroBatch, with_entropy: bool = False):
    """Per-sequence log-probs from one packed forward: list of [len] fp32 tensors, logprob[0] = 0.

    logprob[t] = log p(tokens[t] | tokens[:t]). With `with_entropy` returns (logprobs, entropies), where
    entropy[t] is the entropy of the distribution that predicted tokens[t]. Differentiable: use it under
    torch.no_grad() for the old/proximal recompute.
    """
    enable_packed_attention(model)
    device = next(model.parameters()).device
    mb = mb.to(device)
    with packed_forward():
        out = model(input_ids=mb.input_ids, position_ids=mb.position_ids, use_cache=False, thinkrl_spans=mb.spans)
    lp, ent = token_logprobs(out.logits[0], mb.input_ids[0], mb.prev_index, with_entropy)
    lps = list(lp[mb.token_index].split(mb.seq_lens))
    if not with_entropy:
        return lps
    return lps, list(ent[mb.token_index].split(mb.seq_lens))
