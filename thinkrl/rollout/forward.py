"""Model runners for the embedded engine (sampling: thinkrl.rollout.sampling).

A runner owns the weights and the per-slot KV memory and offers the few operations the scheduler needs:
`extend` (compute new tokens of some slots: prefill, or a prompt continuing a cached prefix), `decode` (one token
for each of slots [0, hi)), `score` (teacher-forced log-probs of whole sequences, outside the slots), and slot
bookkeeping (`ensure`, `copy`, `move`, `save`, `load`, `load_state_dict`).

- `LeanRunner`: a compact forward for the Llama family (llama, qwen2, mistral): RMSNorm, RoPE (the model's own
  rotary module gives the cos/sin tables, so rope_theta and static scalings such as linear/llama3/yarn are exact;
  dynamic and longrope, whose frequencies depend on the sequence length, are refused), GQA without repeating K/V,
  fused qkv and gate/up weights, SwiGLU, q/k/v biases (qwen2), sliding windows, tied embeddings.
- `HFRunner`: the fallback for any other causal LM: keeps token histories per slot and calls the Hugging Face
  model on whole sequences each step (no KV cache: slow, but correct).
"""
from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn.functional as F

from thinkrl.rollout.kvcache import SlotKVCache

LEAN_MODEL_TYPES = ("llama", "qwen2", "mistral")
_LAYER = "model.layers.{}."


def rope_type(config) -> str:
    rp = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return rp.get("rope_type", rp.get("type", "default")) if isinstance(rp, dict) else "default"


def lean_unsupported(model) -> str | None:
    """Why `LeanRunner` cannot run `model` (None when it can)."""
    cfg = model.config
    if cfg.model_type not in LEAN_MODEL_TYPES:
        return f"model_type {cfg.model_type!r} is not one of {LEAN_MODEL_TYPES}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r} (only silu)"
    if rope_type(cfg) in ("dynamic", "longrope"):
        return f"rope type {rope_type(cfg)!r} (frequencies depend on the sequence length)"
    if getattr(getattr(model, "model", None), "rotary_emb", None) is None:
        return "no model.model.rotary_emb module"
    return None


def _mkldnn_linear():
    """oneDNN's fp32 linear (CPU), or None when this torch lacks it or it disagrees with F.linear on a probe."""
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return None
    g = torch.Generator().manual_seed(0)  # never touch the global RNG: it seeds unseeded requests
    try:
        x, w, b = (torch.randn(*shape, generator=g) for shape in ((8, 64), (32, 64), (32,)))
        if not torch.allclose(op(x, w, b, "none", [], ""), F.linear(x, w, b), atol=1e-4, rtol=1e-5):
            return None
    except (RuntimeError, NotImplementedError):
        return None
    return lambda x, w, b=None: op(x, w, b, "none", [], "")


def _seconds(fn, reps: int) -> float:
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return time.perf_counter() - t


def pick_linear(device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int] = (256, 256, 768),
                reps: int = 8):
    """The faster fp32 linear kernel on this CPU for [rows, in] x [out, in]^T = `shape` (rows, in, out): F.linear
    (MKL) or oneDNN's, timed here, interleaved, best of 3 rounds. Which one wins depends on the CPU: oneDNN
    measured 2-2.5x faster on an AMD CPU, MKL 7-10% faster per decode step on an Intel Xeon (AMX)."""
    alt = _mkldnn_linear() if device.type == "cpu" and dtype == torch.float32 else None
    if alt is None:
        return F.linear
    rows, k, n = shape
    k, n = min(k, 1024), min(n, 1024)  # a block of a big model's shape: the choice, not the time, is the point
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g)
    best = {F.linear: float("inf"), alt: float("inf")}
    for _ in range(3):
        for f in best:
            f(x, w)  # warm
            best[f] = min(best[f], _seconds(lambda: f(x, w), reps))
    return min(best, key=best.get)


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    return F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype) * w


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE in three kernels: x * cos + [x2, x1] * sin, where sin carries the sign ([-s, s])."""
    x1, x2 = x.chunk(2, -1)
    return torch.addcmul(x * cos, torch.cat((x2, x1), -1), sin)


class LeanRunner:
    def __init__(self, model, max_slots: int, max_len: int, dtype: torch.dtype, device: torch.device,
                 linear: str = "auto"):
        """`linear`: "auto" times MKL against oneDNN on this CPU and keeps the faster (pick_linear); "torch"
        always uses F.linear (no timing, so the kernel, and with it the numbers, never vary between runs)."""
        if linear not in ("auto", "torch"):
            raise ValueError(f"EmbeddedEngine: linear must be 'auto' or 'torch', got {linear!r}")
        reason = lean_unsupported(model)
        if reason:
            raise ValueError(f"the lean forward cannot run this model: {reason}; use forward='hf'")
        cfg = model.config
        self.dtype, self.device = dtype, device
        self.L, self.H, self.KVH = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
        self.D = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.H
        self.G, self.eps, self.scale = self.H // self.KVH, cfg.rms_norm_eps, self.D ** -0.5
        self.vocab_size = cfg.vocab_size
        self.windows = [self._window(cfg, i) for i in range(self.L)]
        sd = model.state_dict()
        attn0, mlp0 = model.model.layers[0].self_attn, model.model.layers[0].mlp
        qkv_bias, o_bias = attn0.q_proj.bias is not None, attn0.o_proj.bias is not None
        mlp_bias = mlp0.gate_proj.bias is not None
        hd, qn, kn, inter = cfg.hidden_size, self.H * self.D, self.KVH * self.D, cfg.intermediate_size
        self.linear = pick_linear(device, dtype, (min(max_slots, 256), hd, 2 * inter)) if linear == "auto" else F.linear

        def new(*shape):
            return torch.empty(shape, dtype=dtype, device=device)

        self.embed = new(cfg.vocab_size, hd)
        self.norm = new(hd)
        tied = getattr(cfg, "tie_word_embeddings", False) or "lm_head.weight" not in sd
        self.lm_head = self.embed if tied else new(cfg.vocab_size, hd)
        self.targets = {"model.embed_tokens.weight": self.embed, "model.norm.weight": self.norm,
                        "lm_head.weight": self.lm_head}
        self.layers = []
        for i in range(self.L):
            w = dict(qkv=new(qn + 2 * kn, hd), o=new(hd, qn), gu=new(2 * inter, hd), down=new(hd, inter),
                     n1=new(hd), n2=new(hd), qkv_b=new(qn + 2 * kn) if qkv_bias else None,
                     o_b=new(hd) if o_bias else None, gu_b=new(2 * inter) if mlp_bias else None,
                     down_b=new(hd) if mlp_bias else None)
            p = _LAYER.format(i)
            for kind, rows in (("weight", "qkv"), ("bias", "qkv_b")):
                if w[rows] is not None:
                    q_, k_, v_ = w[rows].split([qn, kn, kn])
                    self.targets.update({f"{p}self_attn.q_proj.{kind}": q_, f"{p}self_attn.k_proj.{kind}": k_,
                                         f"{p}self_attn.v_proj.{kind}": v_})
            for kind, rows in (("weight", "gu"), ("bias", "gu_b")):
                if w[rows] is not None:
                    g_, u_ = w[rows].split([inter, inter])
                    self.targets.update({f"{p}mlp.gate_proj.{kind}": g_, f"{p}mlp.up_proj.{kind}": u_})
            for name, key in (("self_attn.o_proj.weight", "o"), ("self_attn.o_proj.bias", "o_b"),
                              ("mlp.down_proj.weight", "down"), ("mlp.down_proj.bias", "down_b"),
                              ("input_layernorm.weight", "n1"), ("post_attention_layernorm.weight", "n2")):
                if w[key] is not None:
                    self.targets[p + name] = w[key]
            self.layers.append(w)
        self.load_state_dict(sd)
        # cos/sin for every position, from the model's own rotary module (exact rope_theta and static scaling)
        rdev = model.model.rotary_emb.inv_freq.device
        with torch.no_grad():
            cos, sin = model.model.rotary_emb(torch.zeros(1, device=rdev), torch.arange(max_len, device=rdev)[None])
        # full-width tables, sin signed for rotate-half; per head, q's also carry the 1/sqrt(D) attention scale
        cos, sin = cos[0].to(device=device, dtype=torch.float32), sin[0].to(device=device, dtype=torch.float32)
        half = self.D // 2
        self.cos, self.sin = cos.to(dtype), torch.cat((-sin[:, :half], sin[:, half:]), -1).to(dtype)
        self.head_scale = torch.tensor([self.scale] * self.H + [1.0] * self.KVH, dtype=dtype, device=device)[:, None]
        self.cache = SlotKVCache(self.L, self.KVH, self.D, max_slots, max_len, dtype, device)

    @staticmethod
    def _window(cfg, i: int) -> int | None:
        win = getattr(cfg, "sliding_window", None)
        types = getattr(cfg, "layer_types", None)
        if types is not None:
            return win if types[i] == "sliding_attention" else None
        return win if cfg.model_type == "mistral" else None

    @torch.no_grad()
    def load_state_dict(self, sd: dict) -> None:
        """Copy weights in place from a state dict with the Hugging Face parameter names."""
        unknown = [k for k in sd if k not in self.targets and not k.endswith("rotary_emb.inv_freq")]
        if unknown:
            raise ValueError(f"update_weights: unknown parameter {unknown[0]!r} ({len(unknown)} unknown)")
        tied = self.lm_head is self.embed
        missing = [k for k in self.targets if k not in sd and not (tied and k == "lm_head.weight")]
        if missing:
            raise ValueError(f"update_weights: missing parameter {missing[0]!r} ({len(missing)} missing)")
        for k, t in sd.items():
            if k in self.targets:
                if self.targets[k].shape != t.shape:
                    raise ValueError(f"update_weights: {k!r} has shape {tuple(t.shape)}, "
                                     f"expected {tuple(self.targets[k].shape)}")
                self.targets[k].copy_(t)

    # -- slot bookkeeping: delegated to the KV cache
    @property
    def kv_bytes(self) -> int:
        return self.cache.nbytes

    def ensure(self, slots: int, length: int) -> None:
        self.cache.ensure(slots, length)

    def copy(self, src: int, dsts: list[int], length: int) -> None:
        self.cache.copy(src, dsts, length)

    def move(self, src: torch.Tensor, dst: torch.Tensor, length: int) -> None:
        self.cache.move(src, dst, length)

    def save(self, slot: int, length: int):
        return self.cache.save(slot, length)

    def load(self, saved, slot: int, length: int) -> None:
        self.cache.load(saved, slot, length)

    # -- compute
    def extend(self, slots: list[int], tokens: list[list[int]], starts: list[int]) -> torch.Tensor:
        """Compute `tokens[b]` at positions starts[b].. of slot slots[b] (attending to the slot's cached
        positions before them); returns fp32 logits of each sequence's last new token, [B, vocab]."""
        dev, B, Tn = self.device, len(slots), max(map(len, tokens))
        ids = torch.zeros(B, Tn, dtype=torch.long)
        for b, t in enumerate(tokens):
            ids[b, : len(t)] = torch.tensor(t)
        start, lens = torch.tensor(starts, device=dev), torch.tensor([len(t) for t in tokens], device=dev)
        # padding entries repeat their row's last position (for RoPE and the mask) and are never stored
        pos = torch.minimum(start[:, None] + torch.arange(Tn, device=dev), (start + lens - 1)[:, None])
        valid = torch.arange(Tn, device=dev)[None] < lens[:, None]
        end = max(s + len(t) for s, t in zip(starts, tokens))
        self.ensure(max(slots) + 1, end)
        x = self._layers(self.embed[ids.to(dev).flatten()], pos, torch.tensor(slots, device=dev), end, valid)
        last = torch.arange(B, device=dev) * Tn + torch.tensor([len(t) - 1 for t in tokens], device=dev)
        return self._logits(x[last])

    def decode(self, hi: int, tok: torch.Tensor, pos: torch.Tensor, length: int) -> torch.Tensor:
        """One token for each slot in [0, hi): tok/pos [hi]; `length` bounds every pos + 1. Logits [hi, vocab]."""
        self.ensure(hi, length)
        x = self._layers(self.embed[tok], pos[:, None], slice(0, hi), length)
        return self._logits(x)

    def score(self, tokens: list[list[int]]) -> list[torch.Tensor]:
        """Teacher-forced log-probs of whole sequences, each `[len - 1]`: log p(tokens[b][t] | tokens[b][:t]) for
        t >= 1. Runs the same layers as extend over a scratch KV cache, so the slots' KV is never touched."""
        dev, B, Tn = self.device, len(tokens), max(map(len, tokens))
        ids = torch.zeros(B, Tn, dtype=torch.long)
        for b, t in enumerate(tokens):
            ids[b, : len(t)] = torch.tensor(t)
        lens = torch.tensor([len(t) for t in tokens], device=dev)
        pos = torch.minimum(torch.arange(Tn, device=dev)[None], (lens - 1)[:, None]).expand(B, Tn).contiguous()
        valid = torch.arange(Tn, device=dev)[None] < lens[:, None]
        scratch = SlotKVCache(self.L, self.KVH, self.D, B, Tn, self.dtype, dev)
        scratch.ensure(B, Tn)
        x = self._layers(self.embed[ids.to(dev).flatten()], pos, torch.arange(B, device=dev), Tn, valid, scratch)
        out = []
        for b, t in enumerate(tokens):
            logp = torch.log_softmax(self._logits(x[b * Tn: b * Tn + len(t) - 1]), -1)
            out.append(logp.gather(-1, ids[b, 1: len(t), None].to(dev))[:, 0])
        return out

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(_rms_norm(x, self.norm, self.eps), self.lm_head).float()

    def _layers(self, x: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor | slice, T: int,
                valid: torch.Tensor | None = None, cache: SlotKVCache | None = None) -> torch.Tensor:
        """`cache`: where K/V are written and read (default: the slots' cache; score passes a scratch one)."""
        cache = self.cache if cache is None else cache
        B, Tn = pos.shape
        H, KVH, G, D = self.H, self.KVH, self.G, self.D
        cos, sin = (t[pos][:, :, None] * self.head_scale for t in (self.cos, self.sin))  # [B, Tn, H+KVH, D]
        if isinstance(slots, slice):
            wslots = torch.arange(slots.start, slots.stop, device=x.device)[:, None]
        else:
            wslots = slots[:, None]
        wpos = pos
        if valid is not None:  # store only the real tokens
            wslots, wpos = wslots.expand(B, Tn)[valid], pos[valid]
        # additive masks [B, 1, G*Tn, T]; query row r = g*Tn + t sits at position pos[b, t]
        qpos = pos.repeat(1, G)[:, None, :, None]
        kpos = torch.arange(T, device=x.device)
        masks = {}
        for win in set(self.windows):
            ok = kpos <= qpos if win is None else (kpos <= qpos) & (kpos > qpos - win)
            masks[win] = torch.zeros(ok.shape, dtype=self.dtype, device=x.device).masked_fill_(~ok, -math.inf)
        for li, (w, win) in enumerate(zip(self.layers, self.windows)):
            h = _rms_norm(x, w["n1"], self.eps)
            qkv = self.linear(h, w["qkv"], w["qkv_b"]).view(B, Tn, H + 2 * KVH, D)
            qk = _rope(qkv[:, :, : H + KVH], cos, sin)  # q (pre-scaled) and k rotated together
            k, v = qk[:, :, H:], qkv[:, :, H + KVH:]
            cache.write(li, wslots, wpos, *((k, v) if valid is None else (k[valid], v[valid])))
            kt, vt = cache.read(li, slots, T)  # [B, KVH, D, T]
            q = qk[:, :, :H].reshape(B, Tn, KVH, G, D).permute(0, 2, 3, 1, 4).reshape(B, KVH, G * Tn, D)
            s = torch.matmul(q, kt).add_(masks[win])
            p = torch.softmax(s, -1, dtype=torch.float32).to(self.dtype)
            o = torch.matmul(p, vt.mT)  # [B, KVH, G*Tn, D]
            o = o.view(B, KVH, G, Tn, D).permute(0, 3, 1, 2, 4).reshape(B * Tn, H * D)
            x = x + self.linear(o, w["o"], w["o_b"])
            gate, up = self.linear(_rms_norm(x, w["n2"], self.eps), w["gu"], w["gu_b"]).chunk(2, -1)
            x = x + self.linear(F.silu(gate) * up, w["down"], w["down_b"])
        return x


class HFRunner:
    """Fallback: token history per slot; every call runs the Hugging Face model on whole sequences."""

    kv_bytes = 0  # no KV cache

    def __init__(self, model, max_slots: int, max_len: int, dtype: torch.dtype, device: torch.device):
        self.model = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
        self.vocab_size = self.model.config.vocab_size
        self.max_slots, self.max_len, self.device = max_slots, max_len, device
        self.hist = torch.zeros(0, 0, dtype=torch.long, device=device)

    def load_state_dict(self, sd: dict) -> None:
        missing, unexpected = self.model.load_state_dict(sd, strict=False)
        if unexpected:
            raise ValueError(f"update_weights: unknown parameter {unexpected[0]!r}")
        if missing:
            raise ValueError(f"update_weights: missing parameter {missing[0]!r}")

    def ensure(self, slots: int, length: int) -> None:
        if slots > self.max_slots or length > self.max_len:
            raise ValueError(f"request ({slots} slots x {length} positions) exceeds max_seqs/max_len")
        S, T = self.hist.shape
        if slots > S or length > T:
            new = torch.zeros(max(S, min(self.max_slots, max(slots, 2 * S))),
                              max(T, min(self.max_len, max(length, 2 * T))), dtype=torch.long, device=self.device)
            new[:S, :T] = self.hist
            self.hist = new

    def copy(self, src: int, dsts: list[int], length: int) -> None:
        self.hist[dsts, :length] = self.hist[src, :length].clone()

    def move(self, src: torch.Tensor, dst: torch.Tensor, length: int) -> None:
        self.hist[dst, :length] = self.hist[src, :length]

    def save(self, slot: int, length: int):
        return self.hist[slot, :length].clone()

    def load(self, saved, slot: int, length: int) -> None:
        self.hist[slot, :length] = saved[:length]

    def extend(self, slots: list[int], tokens: list[list[int]], starts: list[int]) -> torch.Tensor:
        ends = [s + len(t) for s, t in zip(starts, tokens)]
        self.ensure(max(slots) + 1, max(ends))
        for slot, s, t in zip(slots, starts, tokens):
            self.hist[slot, s: s + len(t)] = torch.tensor(t, device=self.device)
        idx = torch.tensor(slots, device=self.device)
        return self._last(self.hist[idx, : max(ends)], torch.tensor(ends, device=self.device) - 1)

    def decode(self, hi: int, tok: torch.Tensor, pos: torch.Tensor, length: int) -> torch.Tensor:
        self.ensure(hi, length)
        self.hist[torch.arange(hi, device=self.device), pos] = tok
        return self._last(self.hist[:hi, :length], pos)

    def score(self, tokens: list[list[int]]) -> list[torch.Tensor]:
        """Teacher-forced log-probs of whole sequences, each `[len - 1]` (as LeanRunner.score)."""
        return hf_token_logprobs(self.model, tokens)

    def _last(self, ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        # right-padded rows need no mask: causal attention never looks past a row's last real token
        logits = self.model(input_ids=ids).logits
        return logits[torch.arange(len(ids), device=ids.device), last].float()


def hf_token_logprobs(model, tokens: list[list[int]]) -> list[torch.Tensor]:
    """Teacher-forced log-probs of whole sequences through a Hugging Face causal LM, each `[len - 1]`:
    log p(tokens[b][t] | tokens[b][:t]) for t >= 1 (fp32 log_softmax of the raw logits), from one forward of the
    right-padded batch with its attention mask, on the model's device."""
    device = next(model.parameters()).device
    ids = torch.zeros(len(tokens), max(map(len, tokens)), dtype=torch.long)
    att = torch.zeros_like(ids)
    for b, t in enumerate(tokens):
        ids[b, : len(t)], att[b, : len(t)] = torch.tensor(t), 1
    ids = ids.to(device)
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=att.to(device)).logits.float(), -1)
    return [logp[b, : len(t) - 1].gather(-1, ids[b, 1: len(t), None])[:, 0] for b, t in enumerate(tokens)]
