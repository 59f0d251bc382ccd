"""Direct preference optimisation on chosen/rejected pairs: the losses (pure tensor functions) and one step.

    ref = pair_logps(trainer, pairs)                     # once, on the starting weights: no second model held
    m = dpo_step(trainer, [pairs[i] for i in idx], [ref[i] for i in idx], cfg.dpo)

A pair is one prompt and two completions. Each step packs every pair into the micro-batches of
`train/packing.py` as one shared-prompt group (``[ prompt | chosen | rejected ]``: both completions attend to
one copy of the prompt), so a pair's two log-probs come out of the same forward and its loss is exact per
micro-batch. Log-probs are sums over completion tokens (the prompt is never scored).

Implicit rewards (what the metrics report): r = β · (log π(y|x) − log π_ref(y|x)) for sigmoid and ipo;
r = β · (mean token log π(y|x)) for simpo (it has no reference).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from thinkrl.data.pairs import PairTokens
from thinkrl.train.packing import Seq

DPO_LOSSES = ("sigmoid", "ipo", "simpo")


@dataclass
class PairLogps:
    """Summed completion log-probs [B] and completion lengths [B] of a batch of pairs."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_len: torch.Tensor
    rejected_len: torch.Tensor


def sigmoid_loss(logits: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7), per pair [B]:

        l = −(1 − ε) · log σ(β·Δ) − ε · log σ(−β·Δ),   Δ = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))

    `logits` is β·Δ. ε > 0 is conservative DPO (Mitchell 2023: the label is flipped with probability ε);
    ε = 0 is TRL's ``loss_type="sigmoid"``."""
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def ipo_loss(chosen_ratio: torch.Tensor, rejected_ratio: torch.Tensor, chosen_len: torch.Tensor,
             rejected_len: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
    eq. 17), per pair [B], with each log-ratio averaged over its completion's tokens (as TRL's ``loss_type="ipo"``,
    the normalisation its authors confirmed):

        l = (ρ_w/|y_w| − ρ_l/|y_l| − 1/(2β))²,   ρ = log π(y) − log π_ref(y)"""
    delta = chosen_ratio / chosen_len.clamp(min=1) - rejected_ratio / rejected_len.clamp(min=1)
    return (delta - 1 / (2 * beta)) ** 2


def simpo_loss(chosen_logp: torch.Tensor, rejected_logp: torch.Tensor, chosen_len: torch.Tensor,
               rejected_len: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", eq. 6),
    per pair [B]: no reference model; the reward is the length-normalised log-prob and γ a target margin:

        l = −log σ(β · (log π(y_w)/|y_w| − log π(y_l)/|y_l|) − γ)"""
    margin = chosen_logp / chosen_len.clamp(min=1) - rejected_logp / rejected_len.clamp(min=1)
    return -F.logsigmoid(beta * margin - gamma)


def preference_loss(pol: PairLogps, ref: PairLogps | None, loss: str, beta: float, gamma: float = 0.0,
                    label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair loss [B], chosen reward [B], rejected reward [B]) of `loss` in DPO_LOSSES; rewards detached.
    `ref` (the reference's summed log-probs) is needed by sigmoid and ipo, ignored by simpo."""
    if loss == "simpo":
        per = simpo_loss(pol.chosen, pol.rejected, pol.chosen_len, pol.rejected_len, beta, gamma)
        rc, rr = beta * pol.chosen / pol.chosen_len.clamp(min=1), beta * pol.rejected / pol.rejected_len.clamp(min=1)
        return per, rc.detach(), rr.detach()
    if ref is None:
        raise ValueError(f"dpo.loss={loss}: needs reference log-probs")
    cr, rr_ = pol.chosen - ref.chosen, pol.rejected - ref.rejected
    if loss == "sigmoid":
        per = sigmoid_loss(beta * (cr - rr_), label_smoothing)
    elif loss == "ipo":
        per = ipo_loss(cr, rr_, pol.chosen_len, pol.rejected_len, beta)
    else:
        raise ValueError(f"dpo.loss: unknown value {loss!r}; valid: {', '.join(DPO_LOSSES)}")
    return per, (beta * cr).detach(), (beta * rr_).detach()


# ---------------------------------------------------------------------------------------------- packed forward
def _seqs(pairs: list[PairTokens]) -> list[Seq]:
    """Chosen at 2i, rejected at 2i+1, one group per pair (they share one copy of the prompt)."""
    out = []
    for i, p in enumerate(pairs):
        out += [Seq(p.prompt + p.chosen, len(p.prompt), f"pair{i}"), Seq(p.prompt + p.rejected, len(p.prompt), f"pair{i}")]
    return out


def _packed_pairs(trainer, pairs: list[PairTokens]):
    """[(pair indices, micro-batch, sequence indices)]; every pair's two sequences sit in one micro-batch."""
    if not trainer.tcfg.packing:
        raise ValueError("train.packing=false: DPO packs each pair's chosen and rejected with one prompt; set train.packing=true")
    seqs = _seqs(pairs)
    out = []
    for group, mb in trainer.micro_batches(seqs, share_prompt=True):
        held = set(group)
        for j in group:
            if j ^ 1 not in held:
                p = pairs[j // 2]
                n = len(p.prompt) + len(p.chosen) + len(p.rejected)
                raise ValueError(f"pair {j // 2}: prompt + chosen + rejected is {n} tokens, more than "
                                 f"train.max_tokens_per_mb={trainer.tcfg.max_tokens_per_mb}")
        out.append((sorted({j // 2 for j in group}), mb, group))
    return out


def _mb_logps(trainer, pairs, mb, group) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Pair index -> (chosen, rejected) summed completion log-probs, from one forward of the micro-batch."""
    lps, _ = trainer.forward(mb)
    seq = {j: lp[len(pairs[j // 2].prompt):].sum() for j, lp in zip(group, lps)}
    return {j // 2: (seq[j], seq[j + 1]) for j in group if j % 2 == 0}


@torch.no_grad()
def pair_logps(trainer, pairs: list[PairTokens]) -> list[tuple[float, float]]:
    """(chosen, rejected) summed completion log-probs of every pair under the trainer's current weights (eval
    mode): the reference log-probs, computed once before the first step."""
    was_training = trainer.model.training
    trainer.model.eval()
    try:
        res: list[tuple[float, float]] = [None] * len(pairs)  # type: ignore[list-item]
        for _, mb, group in _packed_pairs(trainer, pairs):
            for i, (c, r) in _mb_logps(trainer, pairs, mb, group).items():
                res[i] = (float(c), float(r))
        return res
    finally:
        trainer.model.train(was_training)


def _lens(pairs, idx, device) -> tuple[torch.Tensor, torch.Tensor]:
    c = torch.tensor([float(len(pairs[i].chosen)) for i in idx], device=device)
    r = torch.tensor([float(len(pairs[i].rejected)) for i in idx], device=device)
    return c, r


def dpo_step(trainer, pairs: list[PairTokens], ref: list[tuple[float, float]] | None, dcfg) -> dict[str, float]:
    """One optimizer step on `pairs`. The loss is the mean over pairs of `preference_loss`, plus, with
    dcfg.sft_coef = α > 0, α times the negative log-likelihood of the chosen completions averaged over their
    tokens (RPO, Pang et al. 2024 "Iterative Reasoning Preference Optimization": it keeps DPO from lowering the
    chosen answers' likelihood along with the rejected ones'). `ref[i]`: pair i's reference (chosen, rejected)
    log-probs (None for simpo). Returns the `dpo/*` metrics of the batch, before the update."""
    if not pairs:
        raise ValueError("dpo_step: no pairs")
    trainer.model.train()
    trainer.optimizer.zero_grad(set_to_none=True)
    n = float(len(pairs))
    chosen_tokens = float(sum(len(p.chosen) for p in pairs))  # the SFT term is a mean over the batch's chosen tokens
    sums = dict.fromkeys(("loss", "margin", "acc", "chosen_logp", "rejected_logp", "chosen_reward", "rejected_reward"), 0.0)
    for idx, mb, group in _packed_pairs(trainer, pairs):
        got = _mb_logps(trainer, pairs, mb, group)
        dev = got[idx[0]][0].device
        cl, rl = _lens(pairs, idx, dev)
        pol = PairLogps(torch.stack([got[i][0] for i in idx]), torch.stack([got[i][1] for i in idx]), cl, rl)
        rp = None
        if ref is not None:
            rp = PairLogps(torch.tensor([ref[i][0] for i in idx], device=dev), torch.tensor([ref[i][1] for i in idx], device=dev), cl, rl)
        per, rc, rr = preference_loss(pol, rp, dcfg.loss, dcfg.beta, dcfg.simpo_gamma, dcfg.label_smoothing)
        loss = per.sum() / n
        if dcfg.sft_coef > 0:  # + α · NLL of the chosen completions (TRL: loss_type [sigmoid, sft], weights [1, α])
            loss = loss - dcfg.sft_coef * pol.chosen.sum() / max(chosen_tokens, 1.0)
        (loss * trainer.world_size).backward()
        sums["loss"] += float(loss.detach())
        sums["margin"] += float((rc - rr).sum())
        sums["acc"] += float((rc > rr).float().sum())
        sums["chosen_logp"] += float(pol.chosen.detach().sum())
        sums["rejected_logp"] += float(pol.rejected.detach().sum())
        sums["chosen_reward"] += float(rc.sum())
        sums["rejected_reward"] += float(rr.sum())
    gnorm = trainer._optimizer_step(sums["loss"])  # the NaN guard: a NaN/Inf step leaves the weights as they were
    trainer.version += 1
    out = {"dpo/loss": sums["loss"], **{f"dpo/{k}": v / n for k, v in sums.items() if k != "loss"}}
    out["dpo/reward_margin"] = out.pop("dpo/margin")
    out["dpo/reward_acc"] = out.pop("dpo/acc")
    return {**out, "grad/norm": gnorm, "lr": trainer.scheduler.get_last_lr()[0], **trainer.guard.metrics()}
