"""The `algo` config section (owned by the algorithm package).

Reward pipeline, in the order the controller applies it (see `thinkrl.algo.shaping`):
raw verifier reward -> length shaping (cosine / overlong) -> `(r - reward_bias) * reward_scale`
-> optional KL penalty (`kl_in_reward`) -> advantage estimator -> on-policy distillation's per-token term
(`distill_teacher`, thinkrl.algo.distill).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AlgoConfig:
    advantage: str = "grpo"  # grpo | dr_grpo | rloo | reinforce_pp | reinforce_pp_baseline | gae | ppo_critic_free
    loss: str = "ppo"  # ppo | decoupled_ppo | gspo | cispo | sapo (registry: thinkrl.algo.losses)
    lr: float = 1e-3
    # PPO's epsilon 0.2 on both sides (verl's clip_ratio_low/high, TRL's epsilon); cispo uses them as the weight's
    # bounds [1 - clip_low, 1 + clip_high] (configs/algo/cispo.yaml sets CISPO's own)
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float = 0.0  # 0: off; else the bound c (> 1) for negative advantages
    loss_agg: str = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    reward_scale: float = 1.0  # r' = (r - reward_bias) * reward_scale
    reward_bias: float = 0.0
    ppo_epochs: int = 1  # optimisation passes over each batch
    mask_uniform_groups: bool = False  # drop groups whose rewards are all equal from the loss
    norm_std: bool = True  # grpo: divide by group std
    gamma: float = 1.0
    lam: float = 1.0
    # --- KL placement: False -> kl_coef * k(logp, ref_logp) in the loss; True -> subtracted from the reward
    kl_in_reward: bool = False
    # --- advantages
    adv_whiten: bool = True  # gae / ppo_critic_free: normalise advantages over the batch's tokens
    # --- value model (advantage: gae; thinkrl.train.critic)
    critic_lr: float | None = None  # None: algo.lr
    value_clip: float = 0.0  # PPO value clipping around the values used for GAE (0: off)
    critic_warmup_steps: int = 0  # first RL steps train only the critic (the policy is not updated)
    # --- aggregation: Dr.GRPO constant normaliser; 0 -> LossInput.max_len (the batch's max response length)
    max_len_norm: int = 0
    # --- off-policy corrections
    # engine vs trainer log-probs (registry: thinkrl.algo.corrections): none | tis_token | tis_sequence | mis |
    # icepop | mis+tis_token | mis+tis_sequence (the combinations are declared there, one mask times one weight)
    rollout_correction: str = "none"
    # tis_*: truncation C of the IS weight min(w, C), token and sequence alike: verl's rollout_is_threshold and
    # slime's --tis-clip default, Yao et al.'s C = 2 (TRL's vllm_importance_sampling_clip_max: 3.0)
    tis_cap: float = 2.0
    mis_stat: str = "geometric"  # mis: geometric (mean_t log r per sequence) | sum (sum_t log r)
    # mis: a sequence is kept when exp(statistic) is in [mis_low, mis_high]; the default is verl's geometric band
    # (seq_mean_k1, "0.999_1.001" in its Geo-RS presets); with mis_stat=sum verl's Seq-MIS band is [0.5, 2.0]
    mis_low: float = 0.999
    mis_high: float = 1.001
    # icepop: tokens whose ratio leaves [icepop_low, icepop_high] are dropped; the IcePop paper's [0.5, 5]
    # (Ring-1T; AReaL's token-mask upper bound is 5.0 too)
    icepop_low: float = 0.5
    icepop_high: float = 5.0
    # decoupled_ppo: drop tokens whose behaviour weight > cap; 0: no cap, AReaL's default (rejection_sampling=None)
    behav_weight_cap: float = 0.0
    # --- sapo: temperatures of the soft gate for positive / negative advantages (tau_neg >= tau_pos); the SAPO
    # paper's 1.0 / 1.05, also verl's (tau_pos / tau_neg), TRL's (sapo_temperature_*) and AReaL's defaults
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05
    # --- reward shaping (thinkrl.algo.shaping)
    correct_threshold: float = 1.0  # a response is "correct" when its raw reward >= this
    overlong_buffer: float = 0.0  # DAPO soft overlong buffer: tokens if >= 1, fraction of max_len if < 1; 0: off
    overlong_penalty_factor: float = 1.0  # penalty at (and beyond) max_len
    length_reward: str = "none"  # none | cosine (replaces the raw reward, Yeo et al. 2025)
    cosine_correct: list[float] = field(default_factory=lambda: [2.0, 1.0])  # reward at length 0, at max_len
    cosine_wrong: list[float] = field(default_factory=lambda: [-10.0, 0.0])
    cosine_exceed: float = -10.0  # reward of truncated responses
    cosine_correct_max: float | None = None  # cap on correct rewards (clips the short-answer bonus, Light-R1)
    mask_truncated: bool = False  # drop responses with finish == "length" from the loss
    # --- dynamic sampling (DAPO): resample until the batch holds enough non-uniform groups
    dynamic_sampling: bool = False
    dynamic_max_rounds: int = 3  # generation rounds per step, the first included
    # --- on-policy distillation (thinkrl.algo.distill): the teacher scores the student's sampled tokens;
    # A_t = distill_verifier_coef * A^verifier_t - distill_coef * k(log pi_student, log pi_teacher)
    distill_teacher: str = ""  # "": off | a local HF model directory / thinkrl checkpoint (the policy's tokenizer)
    # | http://host:port[,http://host2:port]: inference servers that score the tokens (thinkrl serve, SGLang, vLLM)
    distill_teacher_api: str = "sglang"  # a remote teacher's API: sglang (/generate) | openai (/v1/completions)
    distill_coef: float = 1.0  # weight of the per-token reverse-KL term (> 0)
    distill_verifier_coef: float = 1.0  # weight of the verifier's advantage (0: pure distillation)
    distill_estimator: str = "k1"  # k1 | k2 | k3 (registry: thinkrl.algo.kl); k1: log pi_S - log pi_T

    def validate(self) -> "AlgoConfig":
        """Checks the fields the generic validator does not know. Raises ConfigError naming the key."""
        from thinkrl.config import ConfigError

        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"algo.{key}: {msg}, got {getattr(self, key)!r}")

        from thinkrl.algo import registered_rollout_corrections

        if self.rollout_correction not in registered_rollout_corrections():
            raise ConfigError(f"algo.rollout_correction: unknown value {self.rollout_correction!r}; "
                              f"valid: {', '.join(registered_rollout_corrections())}")
        need(self.tis_cap > 0, "tis_cap", "must be > 0")
        need(self.mis_stat in ("geometric", "sum"), "mis_stat", "must be geometric or sum")
        need(0 < self.mis_low <= 1, "mis_low", "must be in (0, 1] (equal log-probs keep a sequence)")
        need(self.mis_high >= 1, "mis_high", "must be >= 1 (equal log-probs keep a sequence)")
        need(0 < self.icepop_low <= 1, "icepop_low", "must be in (0, 1] (equal log-probs keep a token)")
        need(self.icepop_high >= 1, "icepop_high", "must be >= 1 (equal log-probs keep a token)")
        need(self.behav_weight_cap == 0 or self.behav_weight_cap > 1, "behav_weight_cap", "must be 0 (off) or > 1")
        need(not (self.loss == "decoupled_ppo" and self.rollout_correction != "none"), "rollout_correction",
             "must be none with algo.loss=decoupled_ppo (its behaviour weight already corrects the mismatch)")
        need(self.dual_clip == 0 or self.loss in ("ppo", "decoupled_ppo", "gspo"), "dual_clip",
             f"applies to the PPO clip (ppo, decoupled_ppo, gspo); must be 0 with algo.loss={self.loss}")
        need(self.sapo_tau_pos > 0, "sapo_tau_pos", "must be > 0")
        need(self.sapo_tau_neg > 0, "sapo_tau_neg", "must be > 0")
        need(self.length_reward in ("none", "cosine"), "length_reward", "must be none or cosine")
        need(len(self.cosine_correct) == 2, "cosine_correct", "must be [reward at length 0, reward at max_len]")
        need(len(self.cosine_wrong) == 2, "cosine_wrong", "must be [reward at length 0, reward at max_len]")
        need(self.overlong_buffer >= 0, "overlong_buffer", "must be >= 0")
        need(self.overlong_penalty_factor >= 0, "overlong_penalty_factor", "must be >= 0")
        need(self.max_len_norm >= 0, "max_len_norm", "must be >= 0 (0: the batch's max response length)")
        need(self.reward_scale != 0, "reward_scale", "must not be 0")
        need(self.entropy_coef >= 0, "entropy_coef", "must be >= 0")
        need(0 <= self.gamma <= 1, "gamma", "must be in [0, 1]")
        need(0 <= self.lam <= 1, "lam", "must be in [0, 1]")
        need(self.dynamic_max_rounds >= 1, "dynamic_max_rounds", "must be >= 1")
        need(self.critic_lr is None or self.critic_lr > 0, "critic_lr", "must be > 0 (or null: algo.lr)")
        need(self.value_clip >= 0, "value_clip", "must be >= 0 (0: off)")
        need(self.critic_warmup_steps >= 0, "critic_warmup_steps", "must be >= 0")
        from thinkrl.algo import registered_kl

        need(self.distill_estimator in registered_kl(), "distill_estimator", f"must be one of {', '.join(registered_kl())}")
        need(self.distill_coef > 0, "distill_coef", "must be > 0 (unset algo.distill_teacher for no distillation)")
        need(self.distill_verifier_coef >= 0, "distill_verifier_coef", "must be >= 0 (0: pure distillation)")
        from thinkrl.rollout.wire import APIS  # a remote teacher speaks the remote engine's wire formats

        need(self.distill_teacher_api in APIS, "distill_teacher_api", f"must be one of {', '.join(APIS)}")
        if "://" in self.distill_teacher:
            need(all(u.strip().startswith(("http://", "https://")) and u.split("://", 1)[1].strip()
                     for u in self.distill_teacher.split(",")), "distill_teacher",
                 "a remote teacher is one or more comma-separated http:// or https:// URLs")
        need(not (self.distill_teacher and self.distill_verifier_coef == 0 and self.mask_uniform_groups),
             "mask_uniform_groups", "must be false in pure distillation (algo.distill_verifier_coef=0): it would drop "
             "the teacher's signal on every group whose rewards are equal")
        return self
