"""Rollout corrections (engine vs trainer log-probs) and the mismatch metrics: hand-computed values on small
tensors, the no-op property with equal log-probs, exactly zero gradient on dropped tokens, split invariance."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import thinkrl.config as C
from thinkrl.algo import get_loss, get_rollout_correction, registered_losses, registered_rollout_corrections
from thinkrl.algo.config import AlgoConfig
from thinkrl.algo.corrections import mismatch_metrics
from thinkrl.algo.losses import LossInput, reduce_metrics

D = torch.float64
QUICKSTART = "thinkrl/configs/quickstart.yaml"


def make(log_r, seq_ids, adv=None, mask=None, ratios=None):
    """One micro-batch with the whole batch: old_logp = -1, behav_logp = old - log_r (so log r_t = log_r[t]),
    logp = old + log(ratios) (default: ratio 1)."""
    n = len(log_r)
    old = torch.full((n,), -1.0, dtype=D)
    logp = (old + torch.log(torch.tensor(ratios or [1.0] * n, dtype=D))).requires_grad_(True)
    m = torch.tensor(mask or [1.0] * n, dtype=D)
    ids = torch.tensor(seq_ids)
    return LossInput(logp=logp, old_logp=old, advantages=torch.tensor(adv or [1.0] * n, dtype=D), mask=m,
                     seq_ids=ids, num_tokens=float(m.sum()), num_seqs=float(len(set(seq_ids))),
                     behav_logp=old - torch.tensor(log_r, dtype=D))


def correct(name, inp, **cfg):
    return get_rollout_correction(name)(inp, AlgoConfig(rollout_correction=name, **cfg))


# seq 0: log r .3, -.1 (mean .1, sum .2) | seq 1: .05 | seq 2: .2, -.2 (0, 0) | seq 3: .08, .08 (.08, .16)
LOG_R = [0.3, -0.1, 0.05, 0.2, -0.2, 0.08, 0.08]
SEQS = [0, 0, 1, 2, 2, 3, 3]


def test_mis_geometric_and_sum():
    w, m = correct("mis", make(LOG_R, SEQS), mis_low=0.9, mis_high=1.1)  # e^.1 = 1.105 leaves the band
    assert w.tolist() == [0, 0, 1, 1, 1, 1, 1]
    assert m["is/mis_masked_frac"] == pytest.approx(1 / 4) and m["is/mis_masked_token_frac"] == pytest.approx(2 / 7)
    w, m = correct("mis", make(LOG_R, SEQS), mis_stat="sum", mis_low=0.9, mis_high=1.1)  # e^.16 = 1.17 too
    assert w.tolist() == [0, 0, 1, 1, 1, 0, 0]
    assert m["is/mis_masked_frac"] == pytest.approx(2 / 4) and m["is/mis_masked_token_frac"] == pytest.approx(4 / 7)
    # the lower edge: e^-.1 = .905 < .95 drops a sequence whose geometric mean is below the band
    w, _ = correct("mis", make([-0.1, 0.0], [0, 1]), mis_low=0.95, mis_high=1.05)
    assert w.tolist() == [0, 1]


def test_icepop_masks_outside_and_weights_inside():
    log_r = [math.log(0.4), math.log(0.6), math.log(3.0), math.log(6.0)]
    w, m = correct("icepop", make(log_r, [0, 0, 1, 1]), icepop_low=0.5, icepop_high=5.0)
    assert torch.allclose(w, torch.tensor([0.0, 0.6, 3.0, 0.0], dtype=D))
    assert m["is/icepop_masked_frac"] == pytest.approx(0.5)
    # in the loss: ppo at ratio 1, A = 1: -(sum_t w_t) / num_tokens, dropped tokens still counted
    loss, m = get_loss("ppo")(make(log_r, [0, 0, 1, 1]), AlgoConfig(rollout_correction="icepop"))
    assert loss.item() == pytest.approx(-(0.6 + 3.0) / 4) and m["is/icepop_masked_frac"] == pytest.approx(0.5)


def test_mis_tis_combination_is_the_product():
    inp = make(LOG_R, SEQS)
    w, m = correct("mis+tis_token", inp, mis_low=0.9, mis_high=1.1, tis_cap=1.2)
    tis = [min(math.exp(x), 1.2) for x in LOG_R]
    assert torch.allclose(w, torch.tensor([0, 0, *tis[2:]], dtype=D))
    assert {"is/mis_masked_frac", "is/tis_max", "is/tis_clip_frac"} <= set(m)
    assert m["is/tis_clip_frac"] == pytest.approx(2 / 7)  # e^.3 and e^.2 > 1.2
    w, _ = correct("mis+tis_sequence", inp, mis_low=0.9, mis_high=1.1, tis_cap=2.0)
    seq_w = [math.exp(0.05), 1.0, 1.0, math.exp(0.16), math.exp(0.16)]
    assert torch.allclose(w, torch.tensor([0, 0, *seq_w], dtype=D))


def test_every_correction_needs_the_engine_logprobs():
    inp = make([0.0], [0])
    inp.behav_logp = None
    for name in registered_rollout_corrections():
        if name != "none":
            with pytest.raises(ValueError, match="behav_logp"):
                correct(name, inp)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-5.0, -0.01), min_size=1, max_size=9), st.data())
def test_equal_logprobs_every_correction_is_a_no_op(logps, data):
    seqs = sorted(data.draw(st.lists(st.integers(0, 3), min_size=len(logps), max_size=len(logps))))
    for name in registered_rollout_corrections():
        inp = make([0.0] * len(logps), seqs)
        inp.old_logp = inp.behav_logp = torch.tensor(logps, dtype=D)
        w, m = correct(name, inp, mis_low=0.999, mis_high=1.001)
        assert torch.equal(w, torch.ones(len(logps), dtype=D)), name
        assert all(v == 0 for k, v in m.items() if k.endswith("frac")), (name, m)


@pytest.mark.parametrize("correction", ["mis", "icepop", "mis+tis_token", "mis+tis_sequence"])
def test_dropped_tokens_have_exactly_zero_gradient(correction):
    # seq 0 leaves the MIS band, token 3 leaves IcePop's; ratios inside every clip range, so each kept token has a
    # gradient, and huge advantages on the dropped ones would make any leak visible
    log_r = [0.5, 0.4, 0.0, math.log(9.0), 0.01]
    seqs = [0, 0, 1, 1, 2]
    for name in registered_losses():
        if name == "decoupled_ppo":  # refused with a rollout correction (its own weight corrects)
            continue
        inp = make(log_r, seqs, adv=[1e6, -1e6, 3.0, 1e6, -2.0], ratios=[1.05, 0.95, 1.1, 1.02, 0.9])
        loss, _ = get_loss(name)(inp, AlgoConfig(loss=name, rollout_correction=correction, mis_low=0.8,
                                                 mis_high=1.25, icepop_low=0.5, icepop_high=5.0))
        loss.backward()
        w, _ = correct(correction, make(log_r, seqs), mis_low=0.8, mis_high=1.25)
        dropped = w == 0
        assert dropped.any() and (~dropped).any()
        assert torch.all(inp.logp.grad[dropped] == 0.0), (name, correction, inp.logp.grad)
        assert torch.all(inp.logp.grad[~dropped] != 0.0), (name, correction, inp.logp.grad)


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 10_000), st.lists(st.integers(1, 5), min_size=2, max_size=5), st.data())
def test_split_invariance_of_corrections_and_mismatch(seed, lens, data):
    g = torch.Generator().manual_seed(seed)
    n, cut = sum(lens), data.draw(st.integers(1, len(lens) - 1))
    ids = torch.tensor([i for i, k in enumerate(lens) for _ in range(k)])
    mask = (torch.rand(n, generator=g) > 0.2).to(D)
    old = -torch.rand(n, generator=g, dtype=D) * 2
    full = dict(logp=old + torch.randn(n, generator=g, dtype=D) * 0.3, old_logp=old,
                advantages=torch.randn(n, generator=g, dtype=D), mask=mask, seq_ids=ids,
                behav_logp=old + torch.randn(n, generator=g, dtype=D) * 0.3)
    counts = dict(num_tokens=float(mask.sum()), num_seqs=float(len(lens)))
    part = lambda sel: LossInput(**{k: v[sel] for k, v in full.items()}, **counts)  # noqa: E731
    first = ids < cut
    whole, pieces = part(torch.ones(n, dtype=torch.bool)), [part(first), part(~first)]
    m_full = mismatch_metrics(whole.logp, whole)
    m_split = reduce_metrics([mismatch_metrics(p.logp, p) for p in pieces])
    assert m_full.keys() == m_split.keys()
    assert all(m_split[k] == pytest.approx(m_full[k], abs=1e-12) for k in m_full)
    for name in registered_rollout_corrections():
        cfg = dict(mis_low=0.8, mis_high=1.25, icepop_low=0.7, icepop_high=1.4)
        w_full, mf = correct(name, whole, **cfg)
        outs = [correct(name, p, **cfg) for p in pieces]
        assert torch.equal(torch.cat([o[0] for o in outs]), w_full), name
        ms = reduce_metrics([o[1] for o in outs])
        assert ms.keys() == mf.keys() and all(ms[k] == pytest.approx(mf[k], abs=1e-12) for k in mf), name


def test_mismatch_metrics_hand_values():
    # trainer - engine on loss tokens: seq 0: .1, -.2 | seq 1: .8 (ratio e^.8 = 2.23 > 2); a masked token: 5
    behav = torch.tensor([-1.0, -1.0, -1.0, -1.0], dtype=D)
    train = behav + torch.tensor([0.1, -0.2, 0.8, 5.0], dtype=D)
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=D)
    inp = LossInput(logp=train, old_logp=train, advantages=torch.zeros(4, dtype=D), mask=mask,
                    seq_ids=torch.tensor([0, 0, 1, 1]), num_tokens=3.0, num_seqs=2.0, behav_logp=behav)
    m = mismatch_metrics(train, inp)
    k3 = lambda d: math.exp(d) - 1 - d  # noqa: E731
    assert m["mismatch/logp_abs_diff_mean"] == pytest.approx((0.1 + 0.2 + 0.8) / 3)
    assert m["mismatch/logp_abs_diff_max"] == pytest.approx(0.8)
    assert m["mismatch/k3"] == pytest.approx((k3(0.1) + k3(-0.2) + k3(0.8)) / 3)
    assert m["mismatch/ratio_out_frac"] == pytest.approx(1 / 3)
    assert m["mismatch/seq_ratio_max"] == pytest.approx(math.exp(0.8))  # seq 1: its one loss token
    assert m["mismatch/seq_ratio_min"] == pytest.approx(math.exp(-0.05))  # seq 0: mean(.1, -.2)
    same = mismatch_metrics(behav, inp)
    assert same == {"mismatch/logp_abs_diff_mean": 0.0, "mismatch/logp_abs_diff_max": 0.0, "mismatch/k3": 0.0,
                    "mismatch/ratio_out_frac": 0.0, "mismatch/seq_ratio_max": 1.0, "mismatch/seq_ratio_min": 1.0}


@pytest.mark.parametrize("override,match", [
    ("algo.rollout_correction=tis", "algo.rollout_correction: unknown value 'tis'; valid: icepop, mis, mis+tis_sequence"),
    ("algo.loss=cispo2", "algo.loss: unknown value 'cispo2'; valid: cispo, decoupled_ppo, gspo, ppo, sapo"),
    ("algo.mis_stat=mean", "algo.mis_stat"),
])
def test_unknown_names_fail_at_load_with_the_valid_list(override, match):
    with pytest.raises(C.ConfigError, match=match.replace("+", r"\+")):
        C.load_config(QUICKSTART, [override, "algo.loss=ppo"] if "loss=" not in override else [override])


def test_refused_combinations():
    with pytest.raises(C.ConfigError, match="algo.rollout_correction"):
        AlgoConfig(loss="decoupled_ppo", rollout_correction="mis").validate()
    with pytest.raises(C.ConfigError, match="algo.dual_clip"):
        AlgoConfig(loss="cispo", dual_clip=3.0).validate()
    with pytest.raises(C.ConfigError, match="algo.mis_high"):
        AlgoConfig(mis_high=0.9).validate()
    AlgoConfig(loss="sapo", rollout_correction="mis+tis_token").validate()


def test_defaults_are_the_peers_values_hand_computed():
    """The AlgoConfig defaults (verl's C = 2 and geometric MIS band [0.999, 1.001], IcePop's [0.5, 5], SAPO's
    tau 1.0 / 1.05) on hand-picked log-ratios; the band 0.99 / 1.01 used before would keep sequences 1 and 2."""
    # geometric means: seq 0 .0005 (1.0005, kept) | seq 1 .002 (1.002 > 1.001) | seq 2 -.0015 (.9985 < .999)
    # | seq 3 (.003 - .002) / 2 = .0005 (kept: one token outside the band, the mean inside)
    log_r = [0.0005, 0.002, -0.0015, 0.003, -0.002]
    w, m = correct("mis", make(log_r, [0, 1, 2, 3, 3]))
    assert w.tolist() == [1, 0, 0, 1, 1] and m["is/mis_masked_frac"] == pytest.approx(2 / 4)
    w, _ = correct("mis", make(log_r, [0, 1, 2, 3, 3]), mis_low=0.99, mis_high=1.01)
    assert w.tolist() == [1, 1, 1, 1, 1]
    w, m = correct("tis_token", make([1.0, math.log(1.5)], [0, 0]))  # e = 2.718 -> 2; 1.5 stays
    assert torch.allclose(w, torch.tensor([2.0, 1.5], dtype=D)) and m["is/tis_clip_frac"] == pytest.approx(0.5)
    w, _ = correct("icepop", make([math.log(x) for x in (0.49, 0.51, 4.9, 5.1)], [0, 0, 0, 0]))
    assert torch.allclose(w, torch.tensor([0.0, 0.51, 4.9, 0.0], dtype=D))
    # sapo at r = 1.5: A = +1: -sigmoid(0.5) * 4 / 1.0 = -2.489837; A = -1: +sigmoid(0.525) * 4 / 1.05 = 2.393585
    inp = make([0.0, 0.0], [0, 1], adv=[1.0, -1.0], ratios=[1.5, 1.5])
    loss, _ = get_loss("sapo")(inp, AlgoConfig(loss="sapo"))
    assert loss.item() == pytest.approx((-2.489837 + 2.393585) / 2, abs=1e-6)
