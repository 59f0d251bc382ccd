"""Rollout corrections and mismatch metrics: the gap between the inference engine's log-probs (behaviour,
`LossInput.behav_logp`) and the trainer's (`LossInput.old_logp`: the trainer's weights the batch is corrected
to, recomputed before the step) on the sampled tokens.

A correction (`algo.rollout_correction`, this registry) maps a LossInput to a per-token weight [N] that the
policy losses multiply their per-token term by: a constant (no gradient), 1 where nothing is corrected, 0 on
the tokens it drops (their gradient is then exactly zero; they still count in the loss normaliser, so every
aggregation stays split-invariant). Signature: fn(inp: LossInput, cfg: AlgoConfig) -> (weight [N], metrics).
With log r_t = old_logp_t - behav_logp_t on loss tokens:

    none              w_t = 1
    tis_token         w_t = min(r_t, C)                                  truncated IS, per token
    tis_sequence      w_it = min(exp(sum_t log r_it), C)                 truncated IS, per sequence
    mis               w_it = 1[exp(s_i) in [mis_low, mis_high]]          sequence masking (MIS)
    icepop            w_t = r_t if r_t in [icepop_low, icepop_high] else 0  token masking (IcePop)
    mis+tis_token     the product of mis and tis_token (the two declared combinations: one mask, one weight)
    mis+tis_sequence  the product of mis and tis_sequence

Defaults (thinkrl/algo/config.py): C = 2 (verl, slime; TRL 3), the MIS band [0.999, 1.001] on the geometric mean
(verl's Geo-RS; its sum band is [0.5, 2]), IcePop's [0.5, 5] (the Ring-1T paper). The formulas are those of verl's
rollout_corr_helper (rollout_is token / sequence, rollout_rs seq_mean_k1 / seq_sum_k1) and TRL's
vllm_importance_sampling_mode (token_truncate, sequence_truncate, sequence_mask: a sequence ratio of sum_t log r).

Metrics are micro-batch contributions like the losses' (`reduce_metrics`): is/tis_max, is/tis_clip_frac,
is/mis_masked_frac (sequences), is/mis_masked_token_frac, is/icepop_masked_frac (tokens).
`mismatch_metrics` measures the gap itself, whatever correction is on (the trainer logs it every step).
"""
from __future__ import annotations

import math

import torch

from thinkrl.algo.aggregation import seq_sums
from thinkrl.algo.losses import LossInput, _frac, masked_max
from thinkrl.algo.registry import register_rollout_correction


def engine_log_ratio(inp: LossInput, name: str) -> torch.Tensor:
    """[N] log r_t = old_logp_t - behav_logp_t on loss tokens, 0 elsewhere; no gradient."""
    if inp.behav_logp is None:
        raise ValueError(f"algo.rollout_correction={name!r} needs LossInput.behav_logp (the inference engine's log-probs)")
    d = (inp.old_logp - inp.behav_logp).detach()
    return torch.where(inp.mask > 0, d, torch.zeros_like(d))


def _seq_stat(log_r: torch.Tensor, mask: torch.Tensor, seq_ids: torch.Tensor, stat: str):
    """Per sequence of the micro-batch: (statistic, loss-token count, each token's index into them); log_r is 0
    off the mask. geometric: mean_t log r_t over the loss tokens (the log of the geometric-mean ratio); sum: sum_t."""
    sums, local = seq_sums(log_r, seq_ids)
    counts, _ = seq_sums(mask.to(log_r.dtype), seq_ids)
    if stat == "geometric":
        return sums / counts.clamp(min=1), counts, local
    if stat == "sum":
        return sums, counts, local
    raise ValueError(f"algo.mis_stat: unknown value {stat!r}; valid: geometric, sum")


@register_rollout_correction("none")
def no_correction(inp: LossInput, cfg) -> tuple[torch.Tensor, dict]:
    """w_t = 1: the engine's samples are trained on as if the trainer had drawn them."""
    return torch.ones_like(inp.mask), {}


def _truncated(log_w: torch.Tensor, inp: LossInput, cfg) -> tuple[torch.Tensor, dict]:
    raw = torch.exp(log_w.clamp(-20.0, 20.0))
    metrics = {"is/tis_max": masked_max(raw, inp.mask), "is/tis_clip_frac": _frac(raw > cfg.tis_cap, inp)}
    return raw.clamp(max=cfg.tis_cap), metrics


@register_rollout_correction("tis_token")
def tis_token(inp: LossInput, cfg) -> tuple[torch.Tensor, dict]:
    """Truncated importance sampling per token (Yao et al. 2025, "Your efficient RL framework secretly brings
    you off-policy RL training"; Olmo 3): w_t = min(exp(old_logp_t - behav_logp_t), C), C = algo.tis_cap (default 2, the blog's and verl's)."""
    return _truncated(engine_log_ratio(inp, "tis_token"), inp, cfg)


@register_rollout_correction("tis_sequence")
def tis_sequence(inp: LossInput, cfg) -> tuple[torch.Tensor, dict]:
    """Truncated IS per sequence (Yao et al. 2025): w_i = min(exp(sum_t (old_logp_it - behav_logp_it)), C)
    on every token of sequence i, C = algo.tis_cap."""
    s, _, local = _seq_stat(engine_log_ratio(inp, "tis_sequence"), inp.mask, inp.seq_ids, "sum")
    return _truncated(s[local], inp, cfg)


@register_rollout_correction("mis")
def mis(inp: LossInput, cfg) -> tuple[torch.Tensor, dict]:
    """Sequence-level masking (MIS; Liu, Li et al. 2025, "When speed kills stability: demystifying RL collapse
    from the training-inference mismatch"; verl's sequence rejection sampling): a sequence whose trainer/engine
    ratio leaves the band is dropped whole, the others are kept with weight 1:

    w_it = 1[mis_low <= exp(s_i) <= mis_high],  s_i = mean_t log r_it (algo.mis_stat=geometric: the
    geometric-mean ratio, independent of length) or sum_t log r_it (sum: the sequence likelihood ratio).
    The default band [0.999, 1.001] is verl's for the geometric mean (a sum grows with length: verl uses [0.5, 2]).
    """
    s, counts, local = _seq_stat(engine_log_ratio(inp, "mis"), inp.mask, inp.seq_ids, cfg.mis_stat)
    keep_seq = (s >= math.log(cfg.mis_low)) & (s <= math.log(cfg.mis_high))
    dropped = (~keep_seq) & (counts > 0)
    metrics = {"is/mis_masked_frac": float(dropped.sum()) / max(float(inp.num_seqs), 1.0),
               "is/mis_masked_token_frac": _frac(dropped[local], inp)}
    return keep_seq[local].to(inp.mask.dtype), metrics


@register_rollout_correction("icepop")
def icepop(inp: LossInput, cfg) -> tuple[torch.Tensor, dict]:
    """IcePop (Ling Team 2025, Ring-1T, "Every step evolves"): token-level discrepancy masking. Tokens whose
    trainer/engine ratio leaves [a, b] are dropped; inside the band the ratio corrects the token, as in the paper:

    w_t = M(r_t) = r_t if a <= r_t <= b else 0,  r_t = exp(old_logp_t - behav_logp_t),
    a, b = algo.icepop_low, algo.icepop_high (the paper: 0.5, 5).
    """
    r = torch.exp(engine_log_ratio(inp, "icepop").clamp(-20.0, 20.0))
    inside = (r >= cfg.icepop_low) & (r <= cfg.icepop_high)
    return torch.where(inside, r, torch.zeros_like(r)), {"is/icepop_masked_frac": _frac(~inside, inp)}


def _product(*parts):
    """A declared combination: the product of the corrections' weights, the union of their metrics."""
    def combined(inp: LossInput, cfg) -> tuple[torch.Tensor, dict]:
        weight, metrics = None, {}
        for fn in parts:
            w, m = fn(inp, cfg)
            weight = w if weight is None else weight * w
            metrics.update(m)
        return weight, metrics

    combined.__doc__ = "The product of " + " and ".join(f"`{p.__name__}`" for p in parts) + " (mask times weight)."
    return combined


register_rollout_correction("mis+tis_token")(_product(mis, tis_token))
register_rollout_correction("mis+tis_sequence")(_product(mis, tis_sequence))


def mismatch_metrics(train_logp: torch.Tensor, inp: LossInput) -> dict[str, float]:
    """The engine/trainer gap on the loss tokens of one micro-batch, as contributions (`reduce_metrics`):

    mismatch/logp_abs_diff_mean   sum_t |log pi_train - log pi_infer| / num_tokens
    mismatch/logp_abs_diff_max    max_t |log pi_train - log pi_infer|
    mismatch/k3                   KL(pi_infer || pi_train) by k3 on the engine's samples (Schulman 2020):
                                  mean_t (r_t - 1 - log r_t), r_t = pi_train / pi_infer
    mismatch/ratio_out_frac       fraction of tokens with r_t outside [1/2, 2]
    mismatch/seq_ratio_max, _min  extremes of the per-sequence geometric-mean ratio exp(mean_t log r_t)
                                  (absent when the micro-batch has no loss token)

    `train_logp` [N]: the trainer's log-probs on the weights the engine sampled with (at eta = 0; with eta > 0
    the gap includes the policy lag). Equal log-probs give 0, 0, 0, 0, 1, 1.
    """
    if inp.behav_logp is None:
        return {}
    # float64 on the CPU (MPS has no float64): at fp32 rounding (|d| ~ 1e-7) k3 ~ d^2 / 2 is below fp32's resolution
    f64 = lambda x: x.detach().cpu().to(torch.float64)  # noqa: E731
    mask, seq_ids = f64(inp.mask), inp.seq_ids.detach().cpu()
    d = torch.where(mask > 0, f64(train_logp) - f64(inp.behav_logp), torch.zeros_like(mask))
    n = max(float(inp.num_tokens), 1.0)
    k3 = torch.expm1(d.clamp(-20.0, 20.0)) - d  # r - 1 - log r, without the cancellation of exp(d) - 1
    out = {
        "mismatch/logp_abs_diff_mean": float((d.abs() * mask).sum()) / n,
        "mismatch/logp_abs_diff_max": masked_max(d.abs(), mask),
        "mismatch/k3": float((k3 * mask).sum()) / n,
        "mismatch/ratio_out_frac": float(((d.abs() > math.log(2.0)) * mask).sum()) / n,
    }
    s, counts, _ = _seq_stat(d, mask, seq_ids, "geometric")
    if bool((counts > 0).any()):
        ratio = torch.exp(s[counts > 0].clamp(-20.0, 20.0))
        out["mismatch/seq_ratio_max"] = float(ratio.max())
        out["mismatch/seq_ratio_min"] = float(ratio.min())
    return out
