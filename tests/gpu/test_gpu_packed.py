"""On the device: the packed and the shared-prompt forward give the unpacked forward's log-probs, and which
attention kernel the packed forward runs there (recorded, and on CUDA a fused one, not SDPA's math fallback).

Packed attention (thinkrl.train.attention) runs flash_attn's varlen kernel when flash_attn is installed and
the forward is in half precision on CUDA; otherwise one masked SDPA call per bucket of similar-length spans,
whose backend torch picks (on CUDA with a boolean mask: the memory-efficient or cuDNN kernel).
Tolerances (|packed - unpacked| over every token): float32 max <= 2e-4; bf16 autocast mean <= 5e-3,
max <= 0.05 (measured on the CPU: fp32 max 1e-6; bf16 mean 5e-5, max 4e-3).
"""
from __future__ import annotations

import contextlib
import random

import pytest
import torch

from thinkrl.bench.train import attention_ops
from thinkrl.models.micro import build_micro_model
from thinkrl.train.packing import Seq, forward_logprobs, make_micro_batches

pytestmark = pytest.mark.gpu
TOL = {"float32": (2e-4, 2e-4), "bfloat16": (5e-3, 0.05)}  # (mean, max)


def _seqs(vocab: int) -> list[Seq]:
    rng = random.Random(0)
    seqs = []
    for g in range(6):
        prompt = [rng.randrange(8, vocab) for _ in range(rng.randint(5, 40))]
        for _ in range(4):
            seqs.append(Seq(prompt + [rng.randrange(8, vocab) for _ in range(rng.randint(1, 60))], len(prompt), f"g{g}"))
    return seqs


def _unpacked(model, seq: Seq, device) -> torch.Tensor:
    ids = torch.tensor([seq.tokens], device=device)
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0]
    return torch.cat([lp.new_zeros(1), lp])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_packed_and_shared_prompt_forward_equal_the_unpacked_one(device, tok, dtype, report, need_bf16):
    if dtype == "bfloat16":
        need_bf16()
    model = build_micro_model(tok, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=768,
                              max_position=128, seed=0).to(device).eval()
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()
    seqs = _seqs(len(tok))
    figures = {"device": str(device), "dtype": dtype, "sequences": len(seqs)}
    with torch.no_grad(), amp:
        ref = [_unpacked(model, s, device) for s in seqs]
        for share in (False, True):
            mbs = make_micro_batches(seqs, 512, share_prompt=share)
            got = [None] * len(seqs)
            for mb in mbs:
                for i, lp in zip(mb.seq_index, forward_logprobs(model, mb)):
                    got[i] = lp
            d = torch.cat([(a - b).abs() for a, b in zip(got, ref)]).double()
            name = "shared" if share else "packed"
            figures[name] = {"micro_batches": len(mbs), "max_abs_diff": d.max().item(), "mean_abs_diff": d.mean().item()}
            mean_tol, max_tol = TOL[dtype]
            assert len(mbs) > 1 and d.mean() <= mean_tol and d.max() <= max_tol, f"{name} {dtype}: {figures[name]}"
        kernels = attention_ops(lambda: forward_logprobs(model, make_micro_batches(seqs, 512, share_prompt=True)[0]))
    figures["packed_attention_ops"] = kernels
    figures["flash_attn_installed"] = _has_flash_attn()
    report(f"packed_attention_{dtype}", figures)
    assert kernels, "no attention kernel recorded"
    if device.type == "cuda":
        assert not any("math" in k for k in kernels), f"the packed forward fell back to SDPA's math kernel: {kernels}"


def _has_flash_attn() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def test_a_wrong_mask_would_be_caught(device, tok):
    """Control: a stream whose spans see each other (one span over two sequences) differs from the unpacked
    forward by far more than the fp32 tolerance."""
    from thinkrl.train.attention import Spans

    model = build_micro_model(tok, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                              max_position=128, seed=0).to(device).eval()
    seqs = _seqs(len(tok))[:2]
    [mb] = make_micro_batches(seqs, 512)
    n = mb.input_ids.shape[1]
    mb.spans = Spans([(0, n, 0, 0)])  # one causal span over both sequences: the second sees the first
    with torch.no_grad():
        got = forward_logprobs(model, mb)
        ref = [_unpacked(model, s, device) for s in seqs]
    assert len(mb.seq_index) == 2  # the stream holds them in this order: the second one sees the first
    assert (got[1] - ref[mb.seq_index[1]]).abs().max() > 100 * TOL["float32"][1]
