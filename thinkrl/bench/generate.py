"""`thinkrl bench generate`: the embedded engine against Hugging Face `model.generate`, side by side.

Both sides get the same micro model (a ~3M-parameter Llama by default), the same random prompts and the same
sampling settings, and both produce per-token log-probs:
- engine: `EmbeddedEngine.generate_batch(prompts, params, n)`; log-probs come with every token.
- HF: what a user would write: a left-padded batch, `generate(do_sample=True, num_return_sequences=n,
  output_logits=True, return_dict_in_generate=True)`, then log_softmax of the returned raw logits gathered at
  the sampled ids (inside the timed region).
Each side first runs an untimed warm-up (`--warmup full`: the same workload on other prompts of the same
lengths, the steady state of an RL loop that generates every step; `--warmup tiny`: a few tokens, so the timed
run also pays one-time costs such as KV-cache allocation). EOS is ignored on both sides (engine:
stop_at_eos=False; HF: min_new_tokens = max_new_tokens), so every sequence has exactly `--new-tokens` tokens.
Reported: tokens/s of each and their ratio, peak memory during each run (RSS growth sampled every 5 ms on CPU;
torch.cuda.max_memory_allocated on CUDA), the engine's log-prob agreement with a teacher-forced HF forward on
its own samples, and the engine's achieved FLOP/s (useful matmul + attention FLOPs, padding excluded) as a
fraction of a large matmul in the engine's dtype timed in the same run. `--device cuda` runs everything on the
GPU (it fails at once without one), times after torch.cuda.synchronize, and names the GPU in the JSON;
`--threads` applies to the CPU only. With `--dtype bfloat16` both sides generate in bf16; the log-prob agreement
is always against the fp32 model.
"""
from __future__ import annotations

import argparse
import os
import threading
import time
from dataclasses import replace

import torch

from thinkrl.bench import register_bench


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakMemory:
    """Peak memory growth over a block: CUDA allocator peak, or RSS sampled by a thread (Linux)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.peak = 0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base, self.stop = _rss(), threading.Event()
        self.peak_abs = self.base

        def poll():
            while not self.stop.wait(0.005):
                self.peak_abs = max(self.peak_abs, _rss())

        self.thread = threading.Thread(target=poll, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.stop.set()
            self.thread.join()
            self.peak = max(self.peak_abs, _rss()) - self.base


def matmul_peak_flops(device: torch.device, n: int = 2048, reps: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Best FLOP/s of an n^3 matmul in `dtype`, with torch.matmul or with oneDNN's linear (CPU fp32; 2-3x faster
    than MKL's sgemm on AMD CPUs), whichever is faster."""
    from thinkrl.device import synchronize
    from thinkrl.rollout.forward import _mkldnn_linear

    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    onednn = _mkldnn_linear() if device.type == "cpu" and dtype == torch.float32 else None
    for f in [torch.matmul] + ([onednn] if onednn else []):
        for _ in range(reps + 1):
            synchronize(device)
            t = time.perf_counter()
            f(a, b)
            synchronize(device)
            best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def useful_flops(cfg, prompt_lens: list[int], n: int, new: int) -> float:
    """Matmul + attention FLOPs the engine must do: each prompt once (shared prefill), then n x (new - 1)
    decoded tokens; attention counted over the real context (2 products x 2 FLOPs x ctx x head_dim x heads)."""
    hd, L, H = cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads
    D = getattr(cfg, "head_dim", None) or hd // H
    per_tok = 2 * L * (hd * (H + 2 * cfg.num_key_value_heads) * D + H * D * hd + 3 * hd * cfg.intermediate_size)
    head = 2 * hd * cfg.vocab_size
    attn = 4 * L * H * D  # x context length
    total = 0.0
    for P in prompt_lens:
        total += P * per_tok + head + attn * P * (P + 1) / 2
        ctx = sum(range(P + 1, P + new))  # decode steps feed tokens at positions P .. P+new-2
        total += n * ((new - 1) * (per_tok + head) + attn * ctx)
    return total


def _hf_generate(model, prompts, pad_id, n, new, temperature, top_p, top_k):
    L = max(map(len, prompts))
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p)
        mask[i, L - len(p):] = 1
    dev = next(model.parameters()).device
    out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), do_sample=True,
                         temperature=temperature, top_p=top_p, top_k=top_k, num_return_sequences=n,
                         max_new_tokens=new, min_new_tokens=new, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=pad_id)
    seqs = out.sequences[:, L:]
    logp = torch.log_softmax(torch.stack(out.logits, 1).float(), -1).gather(2, seqs[..., None])[..., 0]
    return seqs.tolist(), logp.tolist()


def logprob_agreement(model, prompts, groups) -> float:
    """Max |engine logprob - HF forward logprob| over the given samples (teacher forcing, right-padded)."""
    rows = [(p, g) for p, gens in zip(prompts, groups) for g in gens]
    L = max(len(p) + len(g.tokens) for p, g in rows)
    dev = next(model.parameters()).device
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    for i, (p, g) in enumerate(rows):
        ids[i, : len(p) + len(g.tokens)] = torch.tensor(p + g.tokens)
    logits = model(input_ids=ids.to(dev)).logits.float()
    worst = 0.0
    for i, (p, g) in enumerate(rows):
        ref = torch.log_softmax(logits[i, len(p) - 1: len(p) + len(g.tokens) - 1], -1)
        ref = ref.gather(1, torch.tensor(g.tokens, device=dev)[:, None])[:, 0].cpu()
        worst = max(worst, (ref - torch.tensor(g.logprobs)).abs().max().item())
    return worst


@register_bench("generate", help="embedded engine vs HF generate: tokens/s ratio, memory, log-prob agreement, FLOP/s")
def bench_generate(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(prog="thinkrl bench generate")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=8, help="samples per prompt")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", default="16:64", help="min:max prompt length (tokens)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (--device cpu only)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda[:N] (fails at once when that device is absent)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="engine dtype")
    ap.add_argument("--max-seqs", type=int, default=0, help="engine slots (default: prompts x n)")
    ap.add_argument("--check-prompts", type=int, default=8, help="prompts whose samples are checked against HF")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--warmup", choices=["full", "tiny"], default="full",
                    help="untimed run before each side's timed run: 'full' = the same workload on other prompts "
                         "of the same lengths (steady state, as in an RL loop that generates every step), "
                         "'tiny' = 2 prompts x 2 x 4 tokens (includes one-time costs: KV allocation, kernel setup)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from thinkrl.device import check_dtype, device_name, resolve_device, synchronize
    from thinkrl.models.micro import build_micro_model, build_tokenizer
    from thinkrl.rollout.engine import EmbeddedEngine
    from thinkrl.types import SamplingParams

    dev = resolve_device(args.device)
    check_dtype(dev, args.dtype, "--dtype")
    if dev.type == "cpu":
        torch.set_num_threads(args.threads)
    lo, hi = (int(x) for x in args.prompt_len.split(":"))
    tok = build_tokenizer()
    model = build_micro_model(tok, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                              num_kv_heads=args.kv_heads, intermediate_size=args.intermediate,
                              max_position=hi + args.new_tokens + 8, seed=args.seed).to(dev).eval()
    g = torch.Generator().manual_seed(args.seed)
    first = len(tok) - 100  # printable characters only (no special tokens)
    prompts = [torch.randint(first, len(tok), (int(torch.randint(lo, hi + 1, (1,), generator=g)),),
                             generator=g).tolist() for _ in range(args.prompts)]
    # warm-up prompts: same lengths, other tokens (so the engine's prefix cache cannot help the timed run)
    warm = [torch.randint(first, len(tok), (len(p),), generator=g).tolist() for p in prompts]
    warm_n, warm_new = (args.n, args.new_tokens) if args.warmup == "full" else (2, 4)
    if args.warmup == "tiny":
        warm = warm[:2]
    n_params = sum(p.numel() for p in model.parameters())
    total = args.prompts * args.n * args.new_tokens
    print(f"model {n_params / 1e6:.2f}M params (hidden {args.hidden}, {args.layers} layers, {args.heads} heads, "
          f"{args.kv_heads} kv heads, intermediate {args.intermediate}); {args.prompts} prompts x {args.n} samples "
          f"x {args.new_tokens} tokens; {torch.get_num_threads()} CPU threads; on {dev} ({device_name(dev)})")
    load = os.getloadavg()[0]
    if dev.type == "cpu" and load > 0.5:
        print(f"warning: load average {load:.1f} before the run: other processes share the cores, timings are "
              f"noisy (with more threads than free cores, small ops can slow down many times)")
    mm = 8192 if dev.type == "cuda" else 2048  # a GPU needs a bigger matmul to reach its peak
    peak = matmul_peak_flops(dev, mm, dtype=getattr(torch, args.dtype))
    print(f"matmul peak ({mm}^3 {args.dtype}): {peak / 1e9:.1f} GFLOP/s")

    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    engine = EmbeddedEngine(model, tok, max_seqs=args.max_seqs or args.prompts * args.n,
                            max_len=hi + args.new_tokens + 8, dtype=args.dtype, stop_at_eos=False)
    with torch.inference_mode():
        engine.generate_batch(warm, replace(params, max_new_tokens=warm_new), n=warm_n)  # warm-up
        with _PeakMemory(dev) as mem_e:
            t = time.perf_counter()
            groups = engine.generate_batch(prompts, params, n=args.n)
            synchronize(dev)
            t_engine = time.perf_counter() - t
    engine.close()
    assert all(len(x.tokens) == args.new_tokens for gs in groups for x in gs)
    flops = useful_flops(model.config, [len(p) for p in prompts], args.n, args.new_tokens)
    res = {"engine_tokens_per_s": total / t_engine, "engine_s": t_engine,
           "engine_peak_mem_mb": mem_e.peak / 2 ** 20, "engine_flops_per_s": flops / t_engine,
           "matmul_peak_flops_per_s": peak, "flops_fraction": flops / t_engine / peak,
           "prompts": args.prompts, "n": args.n, "new_tokens": args.new_tokens, "params": n_params,
           "threads": torch.get_num_threads(), "device": str(dev), "device_name": device_name(dev),
           "dtype": args.dtype, "loadavg_before": load, "hidden": args.hidden, "layers": args.layers,
           "warmup": args.warmup}
    print(f"engine: {res['engine_tokens_per_s']:.0f} tok/s ({t_engine:.2f} s), "
          f"peak mem +{res['engine_peak_mem_mb']:.0f} MB, "
          f"{res['engine_flops_per_s'] / 1e9:.1f} GFLOP/s = {res['flops_fraction']:.1%} of matmul peak")
    with torch.inference_mode():
        k = max(1, min(args.check_prompts, args.prompts))
        res["max_abs_logprob_diff"] = logprob_agreement(model, prompts[:k], groups[:k])
    print(f"engine log-probs vs HF forward ({k} prompts x {args.n}): max |dlogp| = {res['max_abs_logprob_diff']:.2e}")
    if args.skip_hf:
        return res
    model = model.to(getattr(torch, args.dtype))  # HF generate in the engine's dtype (as a user would run it)
    with torch.inference_mode():
        _hf_generate(model, warm, tok.pad_token_id, warm_n, warm_new, args.temperature, args.top_p, args.top_k)
        with _PeakMemory(dev) as mem_h:
            t = time.perf_counter()
            seqs, _ = _hf_generate(model, prompts, tok.pad_token_id, args.n, args.new_tokens, args.temperature,
                                   args.top_p, args.top_k)
            synchronize(dev)
            t_hf = time.perf_counter() - t
    assert all(len(s) == args.new_tokens for s in seqs)
    res.update(hf_tokens_per_s=total / t_hf, hf_s=t_hf, hf_peak_mem_mb=mem_h.peak / 2 ** 20,
               ratio=t_hf / t_engine)
    print(f"hf generate: {res['hf_tokens_per_s']:.0f} tok/s ({t_hf:.2f} s), peak mem +{res['hf_peak_mem_mb']:.0f} MB")
    print(f"ratio engine/hf: {res['ratio']:.2f}x")
    return res
