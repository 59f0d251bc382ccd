"""Aggregation modes: hand values, split invariance with global counts, registry errors."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from thinkrl.algo import (get_advantage, get_kl, get_loss, get_loss_agg, registered_loss_aggs,
                          registered_losses)
from thinkrl.algo.config import AlgoConfig
from thinkrl.algo.losses import LossInput, reduce_metrics

D = torch.float64


def inp_of(per_seq_lens, max_len=0.0):
    ids = torch.tensor([i for i, n in enumerate(per_seq_lens) for _ in range(n)])
    n = len(ids)
    z = torch.zeros(n, dtype=D)
    return LossInput(logp=z, old_logp=z, advantages=z, mask=torch.ones(n, dtype=D), seq_ids=ids,
                     num_tokens=float(n), num_seqs=float(len(per_seq_lens)), max_len=max_len)


def test_hand_values():
    per_token = torch.tensor([1.0, 3.0, 6.0], dtype=D)  # seq 0: [1, 3], seq 1: [6]
    inp = inp_of([2, 1], max_len=4.0)
    assert get_loss_agg("token-mean")(per_token, inp).item() == pytest.approx(10 / 3)
    assert get_loss_agg("seq-mean-token-mean")(per_token, inp).item() == pytest.approx((2 + 6) / 2)
    agg = get_loss_agg("seq-mean-token-sum-norm")
    assert agg(per_token, inp).item() == pytest.approx(10 / 4 / 2)  # LossInput.max_len
    assert agg(per_token, inp, AlgoConfig(max_len_norm=10)).item() == pytest.approx(10 / 10 / 2)  # config wins
    with pytest.raises(ValueError, match="max_len"):
        agg(per_token, inp_of([2, 1]))


def _batch(seed: int, lens: list[int]):
    g = torch.Generator().manual_seed(seed)
    n = sum(lens)
    ids = torch.tensor([i for i, k in enumerate(lens) for _ in range(k)])
    mask = (torch.rand(n, generator=g) > 0.2).to(D)
    old = -torch.rand(n, generator=g, dtype=D) * 2
    return dict(
        logp=old + torch.randn(n, generator=g, dtype=D) * 0.3, old_logp=old,
        advantages=torch.randn(n, generator=g, dtype=D), mask=mask, seq_ids=ids,
        behav_logp=old + torch.randn(n, generator=g, dtype=D) * 0.2, ref_logp=old + torch.randn(n, generator=g, dtype=D) * 0.1,
        entropy=torch.rand(n, generator=g, dtype=D),
    )


def _loss_input(b: dict, sel: torch.Tensor, num_tokens, num_seqs, max_len):
    fields = {k: (v[sel] if k != "logp" else v[sel].clone().requires_grad_(True)) for k, v in b.items()}
    return LossInput(**fields, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)


@settings(max_examples=12, deadline=None)
@given(st.integers(0, 10_000), st.lists(st.integers(1, 6), min_size=2, max_size=6), st.data())
def test_split_invariance_every_mode_and_loss(seed, lens, data):
    cut = data.draw(st.integers(1, len(lens) - 1))  # micro-batch 1 = sequences [0, cut)
    b = _batch(seed, lens)
    num_tokens, num_seqs, max_len = float(b["mask"].sum()), float(len(lens)), float(max(lens))
    everything = torch.ones(sum(lens), dtype=torch.bool)
    first = b["seq_ids"] < cut
    for agg in registered_loss_aggs():
        for name in registered_losses():
            cfg = AlgoConfig(loss=name, loss_agg=agg, kl_coef=0.05, entropy_coef=0.01, dual_clip=3.0,
                             clip_low=0.1, clip_high=0.15, behav_weight_cap=1.3, mis_low=0.8, mis_high=1.2,
                             rollout_correction="none" if name == "decoupled_ppo" else "mis+tis_sequence")
            whole = _loss_input(b, everything, num_tokens, num_seqs, max_len)
            full, m_full = get_loss(name)(whole, cfg)
            parts = [_loss_input(b, s, num_tokens, num_seqs, max_len) for s in (first, ~first)]
            outs = [get_loss(name)(p, cfg) for p in parts]
            total = sum(o[0] for o in outs)
            assert total.item() == pytest.approx(full.item(), abs=1e-10), (agg, name)
            m_split = reduce_metrics([o[1] for o in outs])
            assert m_split.keys() == m_full.keys()
            for k in m_full:
                assert m_split[k] == pytest.approx(m_full[k], abs=1e-10), (agg, name, k)
            full.backward()
            total.backward()
            grad_split = torch.cat([p.logp.grad for p in parts])
            assert torch.allclose(grad_split, whole.logp.grad, atol=1e-12), (agg, name)


@pytest.mark.parametrize("getter,bad", [(get_advantage, "gpro"), (get_loss, "ppo2"), (get_loss_agg, "mean"), (get_kl, "k4")])
def test_unknown_names_list_valid_ones(getter, bad):
    with pytest.raises(ValueError) as e:
        getter(bad)
    msg = str(e.value)
    assert repr(bad) in msg and "valid:" in msg
    assert isinstance(e.value, KeyError)  # older callers catching KeyError keep working


def test_unknown_agg_in_loss_raises():
    b = _batch(0, [2, 2])
    inp = _loss_input(b, torch.ones(4, dtype=torch.bool), 4.0, 2.0, 2.0)
    with pytest.raises(ValueError, match="token-mean"):
        get_loss("ppo")(inp, AlgoConfig(loss_agg="tokens"))
