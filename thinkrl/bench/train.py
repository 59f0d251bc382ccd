"""`thinkrl bench train`: packed vs padded training throughput, and shared-prompt packing.

Workload: P prompts x n responses; response lengths lognormal (median m, capped at 8m), prompts m
tokens long. Each configuration runs forward+backward of a token-level log-likelihood loss on a small
Llama (GQA) over the same sequences, the three configurations interleaved `--repeats` times.

  packed  : 1-D packed streams under --max-tokens (thinkrl.train.packing), no padding anywhere
  padded  : what a user would write: micro-batches of a FIXED NUMBER OF SEQUENCES (the packed run's mean
            sequences per micro-batch, so both run the same number of micro-batches), in data order,
            right-padded to the longest sequence of the micro-batch, attention_mask + cross-entropy
  shared  : packed, plus one copy of each prompt per group (share_prompt=True)

Timing: with 1 CPU thread (the default) each micro-batch is timed in CPU seconds of this process (best of
`--repeats`), so other load on the machine does not distort the ratios; otherwise (and on a GPU) in wall seconds,
after synchronising the device. `--device cuda` fails at once without a GPU; `--bf16` runs the three
configurations under bf16 autocast (model.autocast_bf16). The JSON names the device and the attention kernels
the packed forward ran (aten ops recorded by torch.profiler: SDPA's backend, or flash_attn's varlen).
Throughput is real (unshared, unpadded) sequence tokens per second. Waste: padded = pad tokens / computed
tokens; packed = budget left empty = 1 - stream tokens / (micro-batches x max_tokens) (the packed forward
computes no pad tokens at all; this is what padding every micro-batch to the budget would cost).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import time

import torch
import torch.nn.functional as F

from thinkrl.bench import register_bench
from thinkrl.device import synchronize
from thinkrl.train.allocate import Cost
from thinkrl.train.packing import Seq, forward_logprobs, make_micro_batches


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="thinkrl bench train")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--n", type=int, default=8, help="responses per prompt")
    p.add_argument("--median", type=int, default=32, help="median response length (= prompt length)")
    p.add_argument("--sigma", type=float, default=1.0, help="lognormal sigma of response lengths")
    p.add_argument("--max-tokens", type=int, default=1024, help="micro-batch token budget")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=0, help="MLP width (0: 3 x hidden)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (as model.autocast_bf16=true)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (0: torch's default). With 1 thread on CPU the bench times CPU seconds "
                        "of this process, which stay steady on a busy machine; otherwise wall seconds (CPU only)")
    p.add_argument("--device", default="cpu", help="cpu | cuda[:N] (fails at once when that device is absent)")
    args, rest = p.parse_known_args(argv)
    unknown = [a for a in rest if a != "--json"]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def _workload(a, vocab: int) -> list[Seq]:
    g = torch.Generator().manual_seed(a.seed)
    seqs = []
    for k in range(a.prompts):
        prompt = torch.randint(4, vocab, (a.median,), generator=g).tolist()
        lens = torch.empty(a.n).log_normal_(math.log(a.median), a.sigma, generator=g)
        for r in lens.round().clamp(1, 8 * a.median).long().tolist():
            seqs.append(Seq(prompt + torch.randint(4, vocab, (r,), generator=g).tolist(), a.median, f"p{k}"))
    perm = torch.randperm(len(seqs), generator=g).tolist()  # rollouts finish in any order
    return [seqs[i] for i in perm]


def _step_packed(model, mb, n: int) -> None:
    lps = forward_logprobs(model, mb)
    (-torch.cat(lps).sum() / n).backward()


def _step_padded(model, batch: list[Seq], n: int, pad_id: int) -> None:
    width = max(len(s.tokens) for s in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, s in enumerate(batch):
        ids[i, :len(s.tokens)] = torch.tensor(s.tokens)
        mask[i, :len(s.tokens)] = 1
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                           reduction="sum")
    (loss / n).backward()


def _times(step, items, device: torch.device, cpu_clock: bool) -> list[float]:
    """Seconds per micro-batch (forward + backward): CPU seconds of this process, or wall seconds."""
    clock = time.process_time if cpu_clock else time.perf_counter
    out = []
    for it in items:
        synchronize(device)
        t = clock()
        step(it)
        synchronize(device)
        out.append(clock() - t)
    return out


def attention_ops(fn) -> list[str]:
    """The attention kernels one call of `fn` runs, as aten op names recorded by torch.profiler: SDPA's backend
    (`_scaled_dot_product_{flash,efficient,cudnn}_attention`, `_flash_attention_for_cpu`, the math fallback) or a
    varlen kernel (flash_attn's, torch's `varlen_attn`)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:  # aten ops are recorded on the host for any device
        fn()
    names = {e.key for e in prof.key_averages()}
    keep = ("_scaled_dot_product", "_flash_attention", "_efficient_attention", "_cudnn_attention", "flash_attn",
            "varlen")
    return sorted(n for n in names if any(k in n for k in keep))


@register_bench("train", help="packed vs padded forward+backward tokens/s, padding waste, shared-prompt packing")
def bench_train(argv: list[str]) -> dict:
    from thinkrl.device import check_dtype, device_name, resolve_device
    from thinkrl.models.micro import build_micro_model, build_tokenizer

    a = _args(argv)
    device = resolve_device(a.device)
    if a.bf16:
        check_dtype(device, torch.bfloat16, "--bf16")
    if a.threads and device.type == "cpu":
        torch.set_num_threads(a.threads)
    tok = build_tokenizer()
    model = build_micro_model(tok, hidden_size=a.hidden, num_layers=a.layers, num_heads=a.heads,
                              num_kv_heads=a.kv_heads, intermediate_size=a.intermediate or 3 * a.hidden,
                              max_position=a.median * 9 + 8)
    model = model.to(device).train()
    seqs = _workload(a, len(tok))
    real = sum(len(s.tokens) for s in seqs)
    cost = Cost.for_hidden(a.hidden)
    packed = make_micro_batches(seqs, a.max_tokens, cost=cost)
    shared = make_micro_batches(seqs, a.max_tokens, share_prompt=True, cost=cost)
    per_mb = max(1, round(len(seqs) / len(packed)))
    padded = [seqs[i:i + per_mb] for i in range(0, len(seqs), per_mb)]
    padded_computed = sum(len(b) * max(len(s.tokens) for s in b) for b in padded)

    n = real
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if a.bf16 else contextlib.nullcontext

    def under_amp(step):
        def run(item):
            with amp():
                step(item)
        return run

    runs = {"packed": (under_amp(lambda mb: _step_packed(model, mb, n)), packed),
            "padded": (under_amp(lambda b: _step_padded(model, b, n, tok.pad_token_id)), padded),
            "shared": (under_amp(lambda mb: _step_packed(model, mb, n)), shared)}
    for step, items in runs.values():  # warm up
        step(items[0])
    kernels = attention_ops(lambda: runs["shared"][0](shared[0]))
    model.zero_grad(set_to_none=True)
    # Best time of each micro-batch over interleaved repeats: robust to other load on the machine.
    best = {k: [math.inf] * len(items) for k, (_, items) in runs.items()}
    cpu_clock = device.type == "cpu" and torch.get_num_threads() == 1
    for _ in range(a.repeats):
        for k, (step, items) in runs.items():
            best[k] = [min(x, y) for x, y in zip(best[k], _times(step, items, device, cpu_clock))]
            model.zero_grad(set_to_none=True)
    best = {k: sum(v) for k, v in best.items()}
    tps = {k: real / t for k, t in best.items()}
    stream = {"packed": sum(mb.num_tokens for mb in packed), "shared": sum(mb.num_tokens for mb in shared),
              "padded": padded_computed}
    mbs = {"packed": len(packed), "shared": len(shared), "padded": len(padded)}
    res = {
        "sequences": len(seqs), "real_tokens": real, "max_tokens_per_mb": a.max_tokens,
        "padded_seqs_per_mb": per_mb,
        "packed_tokens_per_s": tps["packed"], "padded_tokens_per_s": tps["padded"],
        "shared_tokens_per_s": tps["shared"],
        "ratio": tps["packed"] / tps["padded"],
        "packed_padding_waste": 1.0 - stream["packed"] / (len(packed) * a.max_tokens),
        "padded_padding_waste": 1.0 - real / padded_computed,
        "shared_prefix_ratio": tps["shared"] / tps["packed"],
        "shared_tokens_saved": real - stream["shared"],
        "micro_batches": mbs,
        "device": str(device), "device_name": device_name(device), "bf16_autocast": a.bf16,
        "hidden": a.hidden, "layers": a.layers, "params": sum(p.numel() for p in model.parameters()),
        "packed_attention_ops": kernels,
    }
    print(f"train bench: {len(seqs)} sequences ({a.prompts} prompts x {a.n}), {real} tokens, "
          f"response median {a.median} (lognormal sigma {a.sigma}, cap {8 * a.median}), prompt {a.median}, "
          f"hidden {a.hidden} x {a.layers} layers, max_tokens_per_mb {a.max_tokens}, on {device} "
          f"({device_name(device)}){', bf16 autocast' if a.bf16 else ''}")
    print(f"packed attention kernels: {', '.join(kernels) or 'none recorded'}")
    print(f"{'':8} {'micro-batches':>13} {'computed tok':>12} {'waste':>7} {'tokens/s':>10}")
    waste = {"packed": res["packed_padding_waste"], "padded": res["padded_padding_waste"],
             "shared": 1.0 - stream["shared"] / (len(shared) * a.max_tokens)}
    for k in ("padded", "packed", "shared"):
        print(f"{k:8} {mbs[k]:>13} {stream[k]:>12} {waste[k]:>7.1%} {tps[k]:>10.0f}")
    print(f"timed in {'CPU' if cpu_clock else 'wall'} seconds, best of {a.repeats} per micro-batch")
    print(f"packed/padded = {res['ratio']:.2f}x (padded: {per_mb} sequences per micro-batch)   "
          f"shared/packed = {res['shared_prefix_ratio']:.2f}x ({res['shared_tokens_saved']} prompt tokens saved)")
    return res
