"""Exact variable-length attention for packed token streams, plugged into Hugging Face models.

A packed micro-batch is one stream of tokens ([1, L]) holding several sequences. Each *span* of the
stream is a run of query tokens that attends causally to itself and, optionally, fully to one earlier
*prefix* span (a prompt shared by several responses). Attention never crosses spans otherwise.

`enable_packed_attention(model)` swaps the model's attention implementation for `thinkrl_varlen`, a
function registered with transformers' `AttentionInterface`. Calls that carry a `thinkrl_spans=`
keyword run the varlen path; every other call (generation, a padded batch) goes to the model's original
implementation unchanged, so the model stays usable everywhere else. The varlen path uses:
  - CUDA + `flash_attn` importable + half precision: one `flash_attn_varlen_func` call (causal masks are
    bottom-right aligned, so a response attending to [prompt, itself] is a plain causal span over a
    gathered key index);
  - otherwise (`bucketed_attention`): spans of similar length gathered into padded batches, one masked SDPA
    call per bucket (exact; memory ~ spans x longest span of the bucket, never [L, L]).
"""
from __future__ import annotations

import contextlib
import contextvars
import sys
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

ATTN_NAME = "thinkrl_varlen"
_BASE: dict[int, str] = {}  # id(config) -> the model's original attention implementation (not saved with it)
_PACKED = contextvars.ContextVar("thinkrl_packed", default=False)
_REGISTERED = False


@dataclass
class Spans:
    """Attention layout of one packed stream.

    bounds[s] = (start, end, prefix_start, prefix_end): queries start..end attend causally to themselves
    and fully to prefix_start..prefix_end (an empty prefix when prefix_start == prefix_end).
    """

    bounds: list[tuple[int, int, int, int]]
    plans: dict = field(default_factory=dict, repr=False, compare=False)  # per device: bucketed_attention's plan

    @property
    def has_prefix(self) -> bool:
        return any(pe > ps for _, _, ps, pe in self.bounds)

    def varlen_args(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int, int]:
        """(cu_seqlens_q, cu_seqlens_k, kv_index or None, max_q, max_k) for flash_attn_varlen_func."""
        q_lens = [e - s for s, e, _, _ in self.bounds]
        k_lens = [e - s + pe - ps for s, e, ps, pe in self.bounds]
        cu_q = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        cu_k = torch.tensor([0] + k_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        kv_index = None
        if self.has_prefix:
            parts = [torch.cat([torch.arange(ps, pe), torch.arange(s, e)]) for s, e, ps, pe in self.bounds]
            kv_index = torch.cat(parts).to(device)
        return cu_q.to(device), cu_k.to(device), kv_index, max(q_lens), max(k_lens)


def _flash_fn(query: torch.Tensor):
    """flash_attn_varlen_func when it can serve this query (CUDA, half precision, flash_attn installed)."""
    if not (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)):
        return None
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def varlen_attention(module, query, key, value, spans: Spans, scaling: float | None = None,
                     dropout: float = 0.0) -> torch.Tensor:
    """query [1, H, L, D], key/value [1, Hkv, L, D] -> output [1, L, H, D] (transformers' layout)."""
    if query.shape[0] != 1:
        raise ValueError(f"packed attention expects batch size 1, got {query.shape[0]}")
    flash = _flash_fn(query)
    if flash is not None:
        cu_q, cu_k, kv_index, max_q, max_k = spans.varlen_args(query.device)
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [L, H, D]
        if kv_index is not None:
            k, v = k.index_select(0, kv_index), v.index_select(0, kv_index)
        out = flash(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=dropout, softmax_scale=scaling, causal=True)
        return out.unsqueeze(0)
    return bucketed_attention(query, key, value, spans, scaling, dropout)


@dataclass
class _Bucket:
    q_index: torch.Tensor  # [S*Qm] stream index of every (span, query row); padding rows repeat a real index
    k_index: torch.Tensor  # [S*Km] stream index of every (span, key column)
    mask: torch.Tensor  # [S, 1, Qm, Km] bool: may attend
    shape: tuple[int, int, int]  # (S, Qm, Km)


def _bucket_plan(spans: Spans, device) -> tuple[list[_Bucket], torch.Tensor]:
    """Spans grouped by query length (powers of two, at least 16) into padded batches, and the index that
    puts the padded outputs back in stream order. Built once per stream and device, reused by every layer."""
    bounds = torch.tensor(spans.bounds, dtype=torch.long).view(-1, 4)
    n, p = bounds[:, 1] - bounds[:, 0], bounds[:, 3] - bounds[:, 2]
    size = n.float().log2().ceil().long().clamp(min=4)  # bucket 2^size >= n (at least 16)
    buckets, where, offset = [], torch.zeros(len(bounds), dtype=torch.long), 0
    for b in size.unique().tolist():
        idx = (size == b).nonzero()[:, 0]
        s, ps, nb, pb = bounds[idx, 0, None], bounds[idx, 2, None], n[idx, None], p[idx, None]
        qm, km = int(nb.max()), int((nb + pb).max())
        r, c = torch.arange(qm)[None], torch.arange(km)[None]
        q_idx = s + torch.where(r < nb, r, 0)  # padding rows repeat the span's first query
        k_idx = torch.where(c < pb, ps + c, torch.where(c < pb + nb, s + c - pb, 0))
        # own tokens causally, the prefix fully: row r sees columns [0, p + r]; padding rows see column 0 only
        # (for a real row r < n, column p + r is its own token: no key beyond the span is ever seen)
        mask = torch.where((r < nb)[:, :, None], c[:, None] <= (pb + r)[:, :, None], c[:, None] == 0)
        buckets.append(_Bucket(q_idx.flatten().to(device), k_idx.flatten().to(device), mask[:, None].to(device),
                               (len(idx), qm, km)))
        where[idx] = offset + torch.arange(len(idx)) * qm
        offset += len(idx) * qm
    # row k of span i holds stream position start_i + k, at padded row where[i] + k: order rows by position
    span_of, k = torch.repeat_interleave(torch.arange(len(bounds)), n), _within(n)
    order = torch.argsort(bounds[span_of, 0] + k)
    return buckets, (where[span_of] + k)[order].to(device)


def _within(n: torch.Tensor) -> torch.Tensor:
    """[0..n_0-1, 0..n_1-1, ...]"""
    total = int(n.sum())
    starts = torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
    return torch.arange(total) - starts


def bucketed_attention(query, key, value, spans: Spans, scaling: float | None = None,
                       dropout: float = 0.0) -> torch.Tensor:
    """Exact varlen attention without a varlen kernel: spans of similar length are gathered into a padded
    batch [S, H, Qm, D] with a boolean mask and run through one SDPA call per bucket (a handful per layer,
    not one per sequence); the rows are gathered back into stream order. Output [1, L, H, D]."""
    cache_key = str(query.device)
    if cache_key not in spans.plans:
        spans.plans[cache_key] = _bucket_plan(spans, query.device)
    buckets, out_index = spans.plans[cache_key]
    H, Hkv, D = query.shape[1], key.shape[1], query.shape[3]
    n_rep = H // Hkv
    gqa = n_rep > 1 and not query.is_cuda  # CUDA's fused kernels take GQA only unmasked
    outs = []
    for b in buckets:
        S, qm, km = b.shape
        q = query[0].index_select(1, b.q_index).view(H, S, qm, D).transpose(0, 1)
        k, v = (t[0].index_select(1, b.k_index).view(Hkv, S, km, D).transpose(0, 1) for t in (key, value))
        if n_rep > 1 and not gqa:
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=b.mask, dropout_p=dropout, scale=scaling,
                                           enable_gqa=gqa)  # [S, H, qm, D]
        outs.append(o.transpose(1, 2).reshape(S * qm, H, D))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.index_select(0, out_index).unsqueeze(0)


def _base_impl(config) -> str:
    return _BASE.get(id(config), "sdpa")  # a deep copy of an enabled model falls back to sdpa (exact too)


def _attention_fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    spans = kwargs.pop("thinkrl_spans", None)
    if spans is not None:
        return varlen_attention(module, query, key, value, spans, scaling=scaling, dropout=dropout), None
    from transformers import AttentionInterface

    base = _base_impl(module.config)
    fn = AttentionInterface._global_mapping.get(base)
    if fn is None:  # "eager" lives in each model's own module
        fn = sys.modules[type(module).__module__].eager_attention_forward
    return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def _mask_fn(*args, **kwargs):
    if _PACKED.get():  # the spans carry the layout: skip building an [L, L] mask
        return None
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return ALL_MASK_ATTENTION_FUNCTIONS[_base_impl(kwargs["config"])](*args, **kwargs)


def _register() -> None:
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(ATTN_NAME, _attention_fn)
        AttentionMaskInterface.register(ATTN_NAME, _mask_fn)
        _REGISTERED = True


def _unwrap(model):
    """The Hugging Face model inside DDP/FSDP/compile wrappers (anything with a `.config`)."""
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    if not hasattr(model, "config"):
        raise ValueError(f"packed attention needs a Hugging Face model with a .config, got {type(model).__name__}")
    return model


def enable_packed_attention(model) -> None:
    """Route the model's attention through `thinkrl_varlen` (idempotent). Unpacked calls behave as before."""
    _register()
    hf = _unwrap(model)
    config = hf.config
    if config._attn_implementation == ATTN_NAME:
        return
    _BASE[id(config)] = config._attn_implementation or "sdpa"
    weakref.finalize(config, _BASE.pop, id(config), None)
    if hasattr(hf, "set_attn_implementation"):
        hf.set_attn_implementation(ATTN_NAME)
    else:
        config._attn_implementation = ATTN_NAME


@contextlib.contextmanager
def packed_forward():
    """Inside: the model builds no attention mask (the `thinkrl_spans` keyword carries the layout)."""
    token = _PACKED.set(True)
    try:
        yield
    finally:
        _PACKED.reset(token)
