"""On-policy distillation: a teacher scores every token the student sampled; the per-token reverse KL is the
(negative) advantage.

The student samples y ~ pi_S (its own rollouts, on-policy), the teacher gives log pi_T(y_t | y_<t) of those
tokens, and each token's advantage is the negative per-token estimate of the reverse KL KL(pi_S || pi_T):

    A_t = distill_verifier_coef * A^verifier_t - distill_coef * k(log pi_S(y_t), log pi_T(y_t))

k is a KL estimator of the registry (`algo.distill_estimator`; thinkrl.algo.kl): k1 = log pi_S - log pi_T
(the default: Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from Self-Generated
Mistakes" (GKD); Lu & Thinking Machines Lab 2025, "On-Policy Distillation": advantage = -(log pi_S - log pi_T)
per token, discount 0); k3 is the non-negative low-variance estimator. log pi_S are the behaviour (sampling)
log-probs, so the term is a constant of the step like any advantage; the PPO-family loss the config names
importance-samples it against the proximal policy. A^verifier_t is the configured estimator's advantage of the
verifier reward (e.g. GRPO's, broadcast over the tokens): distill_verifier_coef = 0 is pure distillation,
1 adds the distillation term to RL (slime's OPD: A_t - lambda * KL_t). Both are 0 off the response mask.
"""
from __future__ import annotations

import torch

from thinkrl.algo.registry import get_kl


def distill_advantages(verifier_adv: torch.Tensor, student_logp: torch.Tensor, teacher_logp: torch.Tensor,
                       response_mask: torch.Tensor, distill_coef: float, verifier_coef: float,
                       estimator: str = "k1") -> torch.Tensor:
    """[B, T] advantages: verifier_coef * verifier_adv - distill_coef * k(student_logp, teacher_logp), 0 off the mask.

    All inputs [B, T] and token-aligned (logp[t] = log p(tokens[t] | tokens[:t])); student_logp are the sampling
    log-probs (no gradient flows through any input)."""
    if not (verifier_adv.shape == student_logp.shape == teacher_logp.shape == response_mask.shape):
        raise ValueError(f"distill_advantages: shapes differ: verifier {tuple(verifier_adv.shape)}, student "
                         f"{tuple(student_logp.shape)}, teacher {tuple(teacher_logp.shape)}, "
                         f"mask {tuple(response_mask.shape)}")
    kl = get_kl(estimator)(student_logp.detach().float(), teacher_logp.detach().float())
    adv = verifier_coef * verifier_adv.detach().float() - distill_coef * kl
    return (adv * response_mask).to(verifier_adv.dtype)


def distill_metrics(student_logp: torch.Tensor, teacher_logp: torch.Tensor,
                    response_mask: torch.Tensor) -> dict[str, float]:
    """distill/reverse_kl: mean over response tokens of log pi_S - log pi_T (the k1 estimate of KL(pi_S || pi_T)
    per token); distill/teacher_logp: mean teacher log-prob of the sampled tokens."""
    m = response_mask.float()
    n = m.sum().clamp(min=1)
    return {"distill/reverse_kl": float(((student_logp.float() - teacher_logp.float()) * m).sum() / n),
            "distill/teacher_logp": float((teacher_logp.float() * m).sum() / n)}
