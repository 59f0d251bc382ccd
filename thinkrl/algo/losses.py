"""Policy losses.

Every loss takes a `LossInput` (flat per-token tensors of one micro-batch, plus the *global*
token/sequence counts of the whole batch so that summing micro-batch losses gives the batch loss
whatever the split) and the AlgoConfig, and returns (loss, metrics).

Total loss = agg(policy term * correction weight) + kl_coef * agg(k(logp, ref_logp))
             - entropy_coef * agg(entropy)
(the KL term only when kl_coef > 0 and not algo.kl_in_reward).

Metrics are micro-batch *contributions*: means are already divided by the global counts, so the
trainer sums them over micro-batches; keys ending in `_max` are reduced with max. `reduce_metrics`
does exactly that (and `*_min` keys with min). Names: loss/policy, loss/kl, loss/entropy, loss/total,
clip/frac, clip/dual_frac, is/ratio_max, is/behav_weight_max, is/behav_masked_frac, kl/mean, entropy/mean,
and the rollout corrections' is/* (thinkrl.algo.corrections).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from thinkrl.algo.aggregation import seq_sums
from thinkrl.algo.registry import get_kl, get_loss_agg, get_rollout_correction, register_loss


@dataclass
class LossInput:
    logp: torch.Tensor  # [N] current policy log-probs (requires grad)
    old_logp: torch.Tensor  # [N] log-probs the ratio is taken against (old / proximal policy)
    advantages: torch.Tensor  # [N]
    mask: torch.Tensor  # [N] float, 1 on loss tokens
    seq_ids: torch.Tensor  # [N] long, global index of the sequence of each token
    num_tokens: float  # loss tokens in the whole batch (all micro-batches, all ranks)
    num_seqs: float  # sequences with at least one loss token in the whole batch
    behav_logp: torch.Tensor | None = None  # [N] inference engine's log-probs (behaviour policy)
    ref_logp: torch.Tensor | None = None  # [N] reference policy (KL)
    entropy: torch.Tensor | None = None  # [N] per-token entropy of the current policy
    max_len: float = 0.0  # max response length in the whole batch (Dr.GRPO normaliser); 0: unset


def masked_max(x: torch.Tensor, mask: torch.Tensor) -> float:
    if mask.sum() == 0:
        return 0.0
    return float(x.detach()[mask > 0].max())


def _frac(flag: torch.Tensor, inp: LossInput) -> float:
    """Contribution of this micro-batch to the batch fraction of loss tokens where flag holds."""
    return float((flag.to(inp.mask.dtype) * inp.mask).sum()) / max(float(inp.num_tokens), 1.0)


def reduce_metrics(per_micro_batch: list[dict]) -> dict[str, float]:
    """Combine loss metrics of micro-batches: sum, except `*_max` keys (max) and `*_min` keys (min)."""
    out: dict[str, float] = {}
    for m in per_micro_batch:
        for k, v in m.items():
            if k not in out:
                out[k] = v
            elif k.endswith("_max"):
                out[k] = max(out[k], v)
            elif k.endswith("_min"):
                out[k] = min(out[k], v)
            else:
                out[k] = out[k] + v
    return out


def clipped_surrogate(ratio: torch.Tensor, adv: torch.Tensor, cfg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clip (Schulman et al. 2017) with clip-higher (DAPO, Yu et al. 2025) and dual clip (Ye et al. 2020):

    l = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high));  if A < 0 and dual_clip = c > 1: l = min(l, -c A).
    Returns (per-token loss, clip mask, dual-clip mask).
    """
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    per_token = torch.maximum(pg1, pg2)
    clipped = pg2 > pg1
    dual = torch.zeros_like(clipped)
    if cfg.dual_clip and cfg.dual_clip > 1:
        bound = -adv * cfg.dual_clip
        dual = (adv < 0) & (per_token > bound)
        per_token = torch.where(dual, bound, per_token)
    return per_token, clipped, dual


def _ratio(logp: torch.Tensor, old_logp: torch.Tensor) -> torch.Tensor:
    return torch.exp((logp - old_logp).clamp(-20.0, 20.0))


def rollout_weights(inp: LossInput, cfg) -> tuple[torch.Tensor, dict]:
    """The per-token weight of algo.rollout_correction (thinkrl.algo.corrections) and its metrics."""
    return get_rollout_correction(cfg.rollout_correction)(inp, cfg)


def _finish(per_token, weight, ratio, clipped, dual, inp: LossInput, cfg, metrics: dict):
    """Weight, aggregate, add KL / entropy terms; fill the shared metrics."""
    mask = inp.mask
    keep = mask > 0 if weight is None else (mask > 0) & (weight != 0)  # dropped tokens: exactly zero gradient
    per_token = torch.where(keep, per_token if weight is None else per_token * weight, torch.zeros_like(per_token))
    agg = get_loss_agg(cfg.loss_agg)
    policy = agg(per_token, inp, cfg)
    loss = policy
    metrics.update({
        "loss/policy": float(policy.detach()),
        "clip/frac": _frac(clipped, inp),
        "is/ratio_max": masked_max(ratio, mask),
    })
    if cfg.dual_clip and cfg.dual_clip > 1:
        metrics["clip/dual_frac"] = _frac(dual, inp)
    kl_in_loss = cfg.kl_coef > 0 and not cfg.kl_in_reward
    if kl_in_loss and inp.ref_logp is None:
        raise ValueError("algo.kl_coef > 0 with the KL in the loss needs LossInput.ref_logp (reference log-probs)")
    if inp.ref_logp is not None:
        kl = get_kl(cfg.kl_estimator)(inp.logp, inp.ref_logp)
        kl = torch.where(mask > 0, kl, torch.zeros_like(kl))
        metrics["kl/mean"] = float((kl.detach() * mask).sum()) / max(float(inp.num_tokens), 1.0)
        if kl_in_loss:
            kl_term = agg(kl, inp, cfg)
            metrics["loss/kl"] = float(kl_term.detach())
            loss = loss + cfg.kl_coef * kl_term
    if cfg.entropy_coef > 0 and inp.entropy is None:
        raise ValueError("algo.entropy_coef > 0 needs LossInput.entropy")
    if inp.entropy is not None:
        metrics["entropy/mean"] = float((inp.entropy.detach() * mask).sum()) / max(float(inp.num_tokens), 1.0)
        if cfg.entropy_coef > 0:
            ent_term = agg(inp.entropy, inp, cfg)
            metrics["loss/entropy"] = float(ent_term.detach())
            loss = loss - cfg.entropy_coef * ent_term
    metrics["loss/total"] = float(loss.detach())
    return loss, metrics


@register_loss("ppo")
def ppo(inp: LossInput, cfg):
    """PPO clip on the token ratio r_t = pi(y_t) / pi_old(y_t) (see `clipped_surrogate`), optionally
    multiplied by the rollout correction's weight (`rollout_weights`, cfg.rollout_correction) for the
    engine/trainer mismatch."""
    ratio = _ratio(inp.logp, inp.old_logp)
    per_token, clipped, dual = clipped_surrogate(ratio, inp.advantages.detach(), cfg)
    weight, metrics = rollout_weights(inp, cfg)
    return _finish(per_token, weight, ratio, clipped, dual, inp, cfg, metrics)


@register_loss("decoupled_ppo")
def decoupled_ppo(inp: LossInput, cfg):
    """Decoupled PPO (Hilton et al. 2022; AReaL, Fu et al. 2025): the clip is taken against the proximal
    policy (old_logp: the trainer's weights before the step; with one optimizer step per batch the trainer
    takes them from the step's own forward, detached) and the behaviour policy (behav_logp, the engine's)
    is corrected by a constant importance weight:

    l_t = w_t * max(-A r_t, -A clip(r_t, 1 - clip_low, 1 + clip_high)),  r_t = pi / pi_prox,
    w_t = pi_prox / pi_behav = exp(old_logp - behav_logp);  tokens with w_t > behav_weight_cap are
    dropped (w_t = 0, as AReaL does) when the cap is > 0. With pi_prox == pi_behav this is `ppo`.
    """
    if inp.behav_logp is None:
        raise ValueError("loss 'decoupled_ppo' needs LossInput.behav_logp (the inference engine's log-probs)")
    ratio = _ratio(inp.logp, inp.old_logp)
    per_token, clipped, dual = clipped_surrogate(ratio, inp.advantages.detach(), cfg)
    w = _ratio(inp.old_logp, inp.behav_logp).detach()
    metrics = {"is/behav_weight_max": masked_max(w, inp.mask)}
    cap = cfg.behav_weight_cap
    if cap and cap > 0:
        over = w > cap
        metrics["is/behav_masked_frac"] = _frac(over, inp)
        w = torch.where(over, torch.zeros_like(w), w)
    return _finish(per_token, w, ratio, clipped, dual, inp, cfg, metrics)


@register_loss("gspo")
def gspo(inp: LossInput, cfg):
    """GSPO (Zheng et al. 2025), token form: the sequence ratio s_i = exp(mean_t log(pi / pi_old)) is
    clipped instead of token ratios. Per token s_it = sg[s_i] * pi(y_t) / sg[pi(y_t)] (same value for
    every token of a sequence; same gradient as GSPO when the advantage is per sequence).
    Use the paper's small clip ranges (e.g. clip_low 3e-4, clip_high 4e-4) and seq-mean-token-mean.
    cfg.rollout_correction applies as in `ppo`."""
    log_r = (inp.logp - inp.old_logp) * inp.mask
    sums, local = seq_sums(log_r.detach(), inp.seq_ids)
    counts, _ = seq_sums(inp.mask.to(log_r.dtype), inp.seq_ids)
    seq_log_s = (sums / counts.clamp(min=1))[local]
    ratio = torch.exp((seq_log_s + inp.logp - inp.logp.detach()).clamp(-20.0, 20.0))
    per_token, clipped, dual = clipped_surrogate(ratio, inp.advantages.detach(), cfg)
    weight, metrics = rollout_weights(inp, cfg)
    return _finish(per_token, weight, ratio, clipped, dual, inp, cfg, metrics)


@register_loss("cispo")
def cispo(inp: LossInput, cfg):
    """CISPO (MiniMax-M1, MiniMax 2025, arXiv 2506.13585): clip the importance weight, not the update. Every token keeps its
    gradient, scaled by the stop-gradient clipped ratio:

    l_t = -sg(clip(r_t, 1 - clip_low, 1 + clip_high)) * A_t * log pi(y_t),  r_t = pi / pi_old.
    Written as -sg(w_t) * A_t * pi(y_t) / sg(pi(y_t)) (the gradient of verl's and TRL's -sg(w_t) A_t log pi;
    the value is -w_t A_t). MiniMax-M1 sets no lower bound (clip_low >= 1) and tunes clip_high without publishing
    it; configs/algo/cispo.yaml caps the weight at 5 (TRL's and slime's recommendation). The paper aggregates
    with token-mean. clip/frac counts the tokens whose weight was clipped; cfg.rollout_correction
    applies as in `ppo`."""
    adv = inp.advantages.detach()
    ratio = _ratio(inp.logp, inp.old_logp)
    w = ratio.detach().clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    per_token = -w * adv * torch.exp(inp.logp - inp.logp.detach())
    clipped = w != ratio.detach()
    weight, metrics = rollout_weights(inp, cfg)
    return _finish(per_token, weight, ratio, clipped, torch.zeros_like(clipped), inp, cfg, metrics)


@register_loss("sapo")
def sapo(inp: LossInput, cfg):
    """SAPO ("Soft adaptive policy optimization", Qwen team 2025, arXiv 2511.20347): a smooth, temperature-controlled gate
    on the token ratio instead of PPO's hard clip:

    l_t = -f(r_t) * A_t,  f(r) = sigmoid(tau (r - 1)) * 4 / tau,  tau = sapo_tau_pos if A_t > 0 else sapo_tau_neg.
    df/dr = 1 at r = 1 (the unclipped policy gradient on-policy) and decays smoothly away from it, faster for
    larger tau (the paper: tau_pos 1.0 < tau_neg 1.05). The paper averages per sequence, then over sequences
    (verl's sapo always aggregates with seq-mean-token-mean; TRL's takes its loss_type's): here algo.loss_agg,
    so set it to seq-mean-token-mean for the paper's objective. No clip: clip_low / clip_high are not used and
    clip/frac is 0. cfg.rollout_correction applies as in `ppo`."""
    adv = inp.advantages.detach()
    ratio = _ratio(inp.logp, inp.old_logp)
    tau = torch.where(adv > 0, torch.full_like(adv, cfg.sapo_tau_pos), torch.full_like(adv, cfg.sapo_tau_neg))
    per_token = -torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau) * adv
    none = torch.zeros_like(ratio, dtype=torch.bool)
    weight, metrics = rollout_weights(inp, cfg)
    return _finish(per_token, weight, ratio, none, none, inp, cfg, metrics)


def value_loss(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, num_tokens: float,
    old_values: torch.Tensor | None = None, clip: float = 0.0,
) -> tuple[torch.Tensor, dict]:
    """Critic loss for `gae`: 0.5 * (V - R)^2 summed over loss tokens / num_tokens (global count, so it
    is split-invariant). With old_values and clip > 0, PPO's value clipping:
    0.5 * max((V - R)^2, (V_old + clip(V - V_old, -clip, clip) - R)^2). Targets R from `gae_returns`."""
    returns = returns.detach()
    l = (values - returns) ** 2
    clipped = torch.zeros_like(l, dtype=torch.bool)
    if old_values is not None and clip > 0:
        v_clip = old_values + (values - old_values).clamp(-clip, clip)
        l2 = (v_clip - returns) ** 2
        clipped = l2 > l
        l = torch.maximum(l, l2)
    n = max(float(num_tokens), 1.0)
    loss = 0.5 * (l * mask).sum() / n
    return loss, {"loss/value": float(loss.detach()), "value/clip_frac": float((clipped.to(mask.dtype) * mask).sum()) / n}
