"""The value model (critic) for PPO with GAE (`algo.advantage: gae`).

Design: a deep copy of the policy's transformer body (`policy.base_model`: the causal LM without its LM
head) plus a scalar linear head (hidden -> 1, fp32). The head starts at zero, so the first values are 0
and the first GAE advantages are those of critic-free PPO; the body starts from the policy's weights
(as verl / OpenRLHF do when no reward model is given). This works for any Hugging Face causal LM, with
no `*ForTokenClassification` class needed, and reuses the trainer's packed forward (`packing.py`).
A LoRA policy gives a critic built from the merged weights that trains all of its parameters.
The critic trains in one process (on rank 0 under data parallelism); it is not sharded.

    critic  = Critic.maybe_create(cfg, run)            # None unless cfg.algo.advantage == "gae"
    values  = critic.values(trajs)                     # values[i][t] = V(tokens[:t]); 0 at t = 0
    batch   = make_batch(trajs, cfg.algo, max_new_tokens, values=values)
    returns = gae_targets(trajs, cfg.algo, max_new_tokens, values)
    metrics = critic.step(trajs, returns, old_values=values)
"""
from __future__ import annotations

import copy
from contextlib import nullcontext

import torch
from torch import nn

from thinkrl.algo.losses import reduce_metrics, value_loss
from thinkrl.train.attention import enable_packed_attention, packed_forward
from thinkrl.train.packing import MicroBatch, make_micro_batches
from thinkrl.train.engine import NanGuard, pad_right
from thinkrl.types import Trajectory


def policy_body(policy) -> nn.Module:
    """A trainable copy of the policy's transformer body (LoRA adapters merged in)."""
    lm = copy.deepcopy(policy).merge_and_unload() if hasattr(policy, "merge_and_unload") else policy  # peft
    base = getattr(lm, "base_model", None)
    if base is None or base is lm or not hasattr(base, "config"):
        raise ValueError(f"critic: cannot find the transformer body of {type(policy).__name__} (no .base_model)")
    body = base if lm is not policy else copy.deepcopy(base)
    body.requires_grad_(True)
    return body


class ValueModel(nn.Module):
    """Transformer body + scalar head. `forward(mb)` -> per-sequence values aligned with the tokens."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body
        hidden = body.config.get_text_config().hidden_size
        device = next(body.parameters()).device
        self.head = nn.Linear(hidden, 1, device=device, dtype=torch.float32)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def _scalar(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden.float())[..., 0]

    def forward_packed(self, mb: MicroBatch) -> list[torch.Tensor]:
        """values[t] = head(h[t - 1]) (the state after tokens[:t]), 0 at each sequence start."""
        enable_packed_attention(self.body)
        mb = mb.to(self.head.weight.device)
        with packed_forward():
            out = self.body(input_ids=mb.input_ids, position_ids=mb.position_ids, use_cache=False,
                            thinkrl_spans=mb.spans)
        v = self._scalar(out.last_hidden_state[0])  # [L]
        prev = mb.prev_index
        v = torch.where(prev >= 0, v[prev.clamp(min=0)], torch.zeros_like(v))
        return list(v[mb.token_index].split(mb.seq_lens))

    def forward_padded(self, seqs: list[list[int]]) -> list[torch.Tensor]:
        ids, att = pad_right(seqs, self.head.weight.device)
        out = self.body(input_ids=ids, attention_mask=att, use_cache=False)
        v = self._scalar(out.last_hidden_state)  # [B, n]
        v = torch.cat([torch.zeros_like(v[:, :1]), v[:, :-1]], dim=1)
        return [v[i, : len(s)] for i, s in enumerate(seqs)]


class Critic:
    """A value model with its own AdamW (constant lr = algo.critic_lr or algo.lr) and its own NaN guard
    (`NanGuard`: a step with NaN/Inf in the loss or the gradients is skipped and counted in `critic/skipped_steps`).

    `values` and `step` split the trajectories into micro-batches exactly like the trainer (packed,
    optionally sharing prompts, under train.max_tokens_per_mb; padded when train.packing is false).
    """

    def __init__(self, policy, acfg, tcfg, autocast_bf16: bool = False):
        self.acfg, self.tcfg = acfg, tcfg
        self.model = ValueModel(policy_body(policy))
        self.model.train()
        self.device = self.model.head.weight.device
        lr = acfg.critic_lr if acfg.critic_lr is not None else acfg.lr
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, betas=tuple(tcfg.betas),
                                           weight_decay=tcfg.weight_decay, fused=self.device.type == "cuda")
        self.autocast = autocast_bf16 and self.device.type in ("cuda", "cpu")
        self.steps = 0  # critic updates done (a skipped one too: it counts toward algo.critic_warmup_steps)
        self.guard = NanGuard("critic")

    @classmethod
    def maybe_create(cls, cfg, run) -> "Critic | None":
        """The run's critic when cfg.algo.advantage is "gae", else None."""
        if cfg.algo.advantage != "gae":
            return None
        return cls(run.model, cfg.algo, cfg.train, autocast_bf16=cfg.model.autocast_bf16)

    @property
    def warming_up(self) -> bool:
        """True during the first algo.critic_warmup_steps updates: the policy should not be trained yet."""
        return self.steps < self.acfg.critic_warmup_steps

    # ------------------------------------------------------------------ forward
    def _micro_batches(self, trajs: list[Trajectory]) -> list[tuple[list[int], object]]:
        if self.tcfg.packing:
            mbs = make_micro_batches(trajs, self.tcfg.max_tokens_per_mb, share_prompt=self.tcfg.share_prompt)
            return [(mb.seq_index, mb) for mb in mbs]
        from thinkrl.train.engine import split_by_tokens

        toks = [t.tokens for t in trajs]
        return [(g, [toks[i] for i in g]) for g in split_by_tokens([len(t) for t in toks], self.tcfg.max_tokens_per_mb)]

    def _forward(self, mb) -> list[torch.Tensor]:
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast else nullcontext()
        with amp:
            if isinstance(mb, MicroBatch):
                return self.model.forward_packed(mb)
            return self.model.forward_padded(mb)

    @torch.no_grad()
    def values(self, trajs: list[Trajectory]) -> list[torch.Tensor]:
        """Per trajectory a float32 CPU tensor [len(tokens)]: values[t] = V(tokens[:t]), 0 at t = 0."""
        out: list[torch.Tensor] = [None] * len(trajs)  # type: ignore[list-item]
        for group, mb in self._micro_batches(trajs):
            for i, v in zip(group, self._forward(mb)):
                out[i] = v.float().cpu()
        return out

    # ------------------------------------------------------------------ update
    def step(self, trajs: list[Trajectory], returns, old_values=None) -> dict[str, float]:
        """Fit the value-loss targets `returns` (per trajectory, aligned with its tokens; from
        `gae_targets`) on the loss tokens: algo.ppo_epochs passes, one optimizer step each.

        The loss is 0.5 * (V - R)^2 summed over loss tokens / the batch's loss-token count (split-invariant);
        with algo.value_clip > 0, clipped around `old_values` (the values GAE used; recomputed if None).
        An epoch whose loss or gradient norm is NaN/Inf is skipped: the weights and the optimizer state stay as
        they were (`NanGuard`; counted in critic/skipped_steps and critic/bad_steps_in_row).
        """
        if len(returns) != len(trajs):
            raise ValueError(f"critic.step: {len(returns)} return lists for {len(trajs)} trajectories")
        for i, (t, r) in enumerate(zip(trajs, returns)):
            if len(r) != len(t.tokens):
                raise ValueError(f"critic.step: returns[{i}] has {len(r)} entries, trajectory has {len(t.tokens)} tokens")
        clip = float(self.acfg.value_clip)
        if clip > 0 and old_values is None:
            old_values = self.values(trajs)
        num_tokens = float(sum(t.num_response_tokens for t in trajs))
        cat = lambda xs: torch.cat([torch.as_tensor(x, dtype=torch.float32) for x in xs]).to(self.device)  # noqa: E731
        mbs = self._micro_batches(trajs)
        params = list(self.model.parameters())
        self.model.train()
        pre: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (V, R, mask) before the update
        for epoch in range(max(1, self.acfg.ppo_epochs)):
            self.optimizer.zero_grad(set_to_none=True)
            per_mb = []
            loss_sum = 0.0
            for group, mb in mbs:
                v = torch.cat(self._forward(mb))
                ret = cat([returns[i] for i in group])
                mask = cat([[float(m) for m in trajs[i].loss_mask] for i in group])
                old = cat([old_values[i] for i in group]) if clip > 0 else None
                loss, m = value_loss(v, ret, mask, num_tokens, old_values=old, clip=clip)
                loss.backward()
                loss_sum += m["loss/value"]
                per_mb.append(m)
                if epoch == 0:
                    pre.append((v.detach(), ret, mask))
            gnorm = self.guard.step(params, self.optimizer, None, self.tcfg.grad_clip, loss_sum)
        self.steps += 1
        out = reduce_metrics(per_mb)  # the last epoch's loss
        out.update(_value_stats(*(torch.cat(x) for x in zip(*pre))))
        out["critic/grad_norm"] = gnorm
        out["critic/lr"] = self.optimizer.param_groups[0]["lr"]
        out.update(self.guard.metrics())
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "steps": self.steps,
                **self.guard.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state["steps"])
        self.guard.load_state_dict(state)  # an older checkpoint without the counts: 0


def _value_stats(v: torch.Tensor, ret: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Mean value / return and explained variance 1 - Var(R - V) / Var(R) on loss tokens (before the update)."""
    sel = mask > 0
    if not sel.any():
        return {}
    v, ret = v[sel].double(), ret[sel].double()
    out = {"value/mean": float(v.mean()), "value/return_mean": float(ret.mean())}
    var = float(ret.var(unbiased=False))
    if var > 1e-12:
        out["value/explained_var"] = 1.0 - float((ret - v).var(unbiased=False)) / var
    return out
