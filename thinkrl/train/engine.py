"""The trainer: owns the model, the optimizer and the schedule; turns a Batch into one update.

    engine = TrainEngine(model, tcfg, acfg)
    old = engine.logprobs(trajs)             # no-grad recompute (proximal / old policy)
    metrics = engine.step(batch)             # PPO-family loss over micro-batches, one optimizer step
    engine.export_weights()                  # state dict for the inference engine
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from thinkrl.algo import get_loss
from thinkrl.algo.corrections import mismatch_metrics
from thinkrl.algo.losses import LossInput, reduce_metrics
from thinkrl.errors import RunFault
from thinkrl.types import Batch, Trajectory


class NumericalFault(RunFault):
    """train.max_bad_steps optimizer steps in a row had NaN/Inf in the loss or the gradients."""


def stop_on_bad_steps(metrics: dict, max_bad_steps: int, step: int) -> None:
    """Raise NumericalFault naming `step` when the metrics show `max_bad_steps` (> 0) bad steps in a row of the
    policy's optimizer (`train/bad_steps_in_row`) or the critic's (`critic/bad_steps_in_row`)."""
    for prefix, who in (("train", ""), ("critic", "critic ")):
        bad = int(metrics.get(f"{prefix}/bad_steps_in_row", 0))  # absent: no such step this time (critic warm-up)
        if max_bad_steps and bad >= max_bad_steps:
            raise NumericalFault(f"step {step}: {bad} {who}optimizer steps in a row had NaN/Inf in the loss or "
                                 f"gradients and were skipped (train.max_bad_steps={max_bad_steps}); stopped, the "
                                 "checkpoints and metrics written before are kept")


@dataclass
class NanGuard:
    """The NaN guard of one optimizer (the policy's: prefix "train"; the critic's: "critic"). `step` clips and
    steps unless the loss or the gradient norm is NaN/Inf: then the gradients are dropped and the weights, the
    optimizer state and the LR schedule stay as they were (the schedule counts applied updates); the skip is
    counted in `skipped_steps` (in all) and `bad_in_row` (the current run of them)."""

    prefix: str
    skipped_steps: int = 0
    bad_in_row: int = 0

    def step(self, params, optimizer, scheduler, grad_clip: float, loss: float, norm_only: bool = False) -> float:
        """One guarded optimizer step; the gradient norm (before clipping). `norm_only`: decide on the norm alone
        (data parallel: the all-reduced norm is the same on every rank, and a rank's NaN loss makes it NaN too)."""
        gnorm = torch.nn.utils.clip_grad_norm_(params, grad_clip or float("inf"))
        g = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)  # the all-reduced gradients' norm
        if math.isfinite(g) and (norm_only or math.isfinite(loss)):
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            self.bad_in_row = 0
        else:
            optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            self.bad_in_row += 1
        return g

    def metrics(self) -> dict[str, float]:
        return {f"{self.prefix}/skipped_steps": float(self.skipped_steps),
                f"{self.prefix}/bad_steps_in_row": float(self.bad_in_row)}

    def state_dict(self) -> dict[str, int]:
        return {"skipped_steps": self.skipped_steps, "bad_in_row": self.bad_in_row}

    def load_state_dict(self, state: dict) -> None:
        """From a checkpoint's state (the keys of `state_dict`; an older checkpoint without them: 0)."""
        self.skipped_steps, self.bad_in_row = int(state.get("skipped_steps", 0)), int(state.get("bad_in_row", 0))


def lr_lambda(schedule: str, warmup: int, total: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant" or total <= warmup:
            return 1.0
        frac = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * frac)) if schedule == "cosine" else 1.0 - frac

    return f


def pad_right(seqs: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [B, max_len], right-padded with 0, on `device`."""
    n = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), n), dtype=torch.long)
    att = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        att[i, : len(s)] = 1
    return ids.to(device), att.to(device)


def split_by_tokens(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Greedy consecutive split of sequence indices so each group's tokens fit the budget."""
    groups, cur, used = [], [], 0
    for i, n in enumerate(lengths):
        if n > max_tokens:
            raise ValueError(f"a sequence of {n} tokens exceeds train.max_tokens_per_mb={max_tokens}")
        if cur and used + n > max_tokens:
            groups.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        groups.append(cur)
    return groups


class TrainEngine:
    def __init__(self, model, tcfg, acfg, lr: float | None = None, total_steps: int | None = None, autocast_bf16: bool = False,
                 warmup_steps: int | None = None, dist=None):
        self.model, self.tcfg, self.acfg = model, tcfg, acfg
        # data parallel (thinkrl.train.distributed): the context of init_distributed, None in one process
        from thinkrl.train.distributed import current

        self.dist = dist if dist is not None else current()
        self.world_size, self.rank = (self.dist.world_size, self.dist.rank) if self.dist else (1, 0)
        if self.dist:
            if not tcfg.packing:
                raise ValueError("train.packing=false: data-parallel training needs packed micro-batches")
            self.dist.share("init", tcfg, acfg, lr, total_steps, autocast_bf16, warmup_steps)
            self.model = self.dist.wrap(model)  # DDP / FSDP2, before the optimizer sees the parameters
        self.device = next(model.parameters()).device
        self.version = 0  # optimizer steps taken, a skipped one (NaN/Inf) too: the policy version
        self.guard = NanGuard("train")  # optimizer steps skipped for NaN/Inf
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params, lr=lr if lr is not None else acfg.lr, betas=tuple(tcfg.betas), weight_decay=tcfg.weight_decay,
            fused=self.device.type == "cuda",
        )
        total = total_steps if total_steps is not None else tcfg.steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(tcfg.lr_schedule, tcfg.warmup_steps if warmup_steps is None else warmup_steps, total))
        self.autocast = autocast_bf16 and (self.device.type in ("cuda", "cpu"))
        # KL to a reference policy (algo.kl_coef > 0): a frozen copy of the starting weights; none otherwise
        self.ref_model = None
        if acfg.kl_coef > 0:
            if self.dist:
                raise ValueError("algo.kl_coef > 0 is not supported with train.world_size > 1 yet")
            import copy

            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)

    # ------------------------------------------------------------------ forward
    def _amp(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast else nullcontext()

    def micro_batches(self, seqs, share_prompt: bool = False) -> list[tuple[list[int], object]]:
        """[(indices into seqs, forward input)] under the token budget: packed (balanced) or padded."""
        if self.tcfg.packing:
            from thinkrl.train.packing import Seq, make_micro_batches

            seqs = [s if hasattr(s, "tokens") else Seq(tokens=list(s)) for s in seqs]
            mbs = make_micro_batches(seqs, self.tcfg.max_tokens_per_mb, share_prompt=share_prompt,
                                     world_size=self.world_size, rank=self.rank)  # this rank's share
            return [(mb.seq_index, mb) for mb in mbs]
        toks = [s.tokens if hasattr(s, "tokens") else s for s in seqs]
        return [(g, [toks[i] for i in g]) for g in split_by_tokens([len(t) for t in toks], self.tcfg.max_tokens_per_mb)]

    def forward(self, mb, with_entropy: bool = False):
        """Per-sequence log-prob tensors (and entropies) of one micro-batch from `micro_batches`."""
        if self.tcfg.packing:
            from thinkrl.train.packing import forward_logprobs

            with self._amp():
                res = forward_logprobs(self.model, mb, with_entropy=with_entropy)
            return res if with_entropy else (res, None)
        return self.forward_logprobs(mb, with_entropy)

    def forward_logprobs(self, seqs: list[list[int]], with_entropy: bool = False):
        """Padded forward. Per-sequence tensors: logp[t] = log p(tokens[t] | tokens[:t]) (logp[0] = 0)."""
        ids, att = pad_right(seqs, self.device)
        with self._amp():
            logits = self.model(input_ids=ids, attention_mask=att, use_cache=False).logits
        logits = logits[:, :-1].float()
        lse = torch.logsumexp(logits, dim=-1)
        tgt = logits.gather(-1, ids[:, 1:, None])[..., 0] - lse
        logp = torch.cat([torch.zeros_like(tgt[:, :1]), tgt], dim=1)
        ent = None
        if with_entropy:
            p = torch.softmax(logits, dim=-1)
            e = lse - (p * logits).sum(-1)
            ent = torch.cat([torch.zeros_like(e[:, :1]), e], dim=1)
        out = [logp[i, : len(s)] for i, s in enumerate(seqs)]
        ents = [ent[i, : len(s)] for i, s in enumerate(seqs)] if with_entropy else None
        return out, ents

    @torch.no_grad()
    def logprobs(self, trajs: list[Trajectory]) -> list[list[float]]:
        if self.dist:
            (trajs,) = self.dist.share("logprobs", trajs)
        res: list[list[float]] = [None] * len(trajs)  # type: ignore
        for group, mb in self.micro_batches(trajs, share_prompt=self.tcfg.share_prompt):
            lps, _ = self.forward(mb)
            for i, lp in zip(group, lps):
                res[i] = lp.tolist()
        return self.dist.gather_logprobs(res) if self.dist else res

    # ------------------------------------------------------------------ RL step
    @torch.no_grad()
    def ref_logprobs(self, trajs: list[Trajectory]) -> list[list[float]]:
        """Log-probs of the reference policy (the frozen starting weights), for the KL term."""
        if self.ref_model is None:
            raise ValueError("ref_logprobs: no reference model (algo.kl_coef is 0)")
        live, self.model = self.model, self.ref_model
        try:
            return self.logprobs(trajs)
        finally:
            self.model = live

    def step(self, batch: Batch, old_logprobs: list[list[float]] | None = None,
             ref_logprobs: list[list[float]] | None = None) -> dict[str, float]:
        """One optimizer step on the batch (ppo_epochs passes of micro-batches if > 1)."""
        t0 = time.perf_counter()
        if self.dist:  # rank 0 hands the batch to the serving ranks; every rank then takes its micro-batches
            batch, old_logprobs = self.dist.share("step", batch, old_logprobs)
        trajs = batch.trajectories
        loss_fn = get_loss(self.acfg.loss)
        # decoupled PPO's proximal policy is the weights before this step: without recomputed log-probs (one
        # epoch) they are the step's own forward, detached; other losses default to the behaviour log-probs
        proximal_inline = old_logprobs is None and self.acfg.loss == "decoupled_ppo"
        if proximal_inline and self.acfg.ppo_epochs > 1:
            raise ValueError("decoupled_ppo with algo.ppo_epochs > 1 needs recomputed proximal log-probs")
        old = old_logprobs if old_logprobs is not None else [t.logprobs for t in trajs]
        num_tokens = float(sum(t.num_response_tokens for t in trajs))
        num_seqs = float(len(trajs))
        max_len = max((t.num_response_tokens for t in trajs), default=1)
        mbs = self.micro_batches(trajs, share_prompt=self.tcfg.share_prompt)
        self.model.train()
        gap = []  # mismatch/*: engine vs trainer log-probs, on the weights the step starts from (first epoch)
        for epoch in range(self.acfg.ppo_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            per_mb = []
            loss_sum = 0.0
            for j, (group, mb) in enumerate(mbs):
                if self.dist:
                    self.dist.grad_sync(self.model, j == len(mbs) - 1)
                lps, ents = self.forward(mb, with_entropy=True)
                cat = lambda xs: torch.cat([torch.as_tensor(x, dtype=torch.float32) for x in xs]).to(self.device)  # noqa: E731
                logp = torch.cat(lps)
                inp = LossInput(
                    logp=logp,
                    old_logp=logp.detach() if proximal_inline else cat([old[i] for i in group]),
                    advantages=cat([batch.advantages[i] for i in group]),
                    mask=cat([[float(m) for m in trajs[i].loss_mask] for i in group]),
                    seq_ids=torch.cat([torch.full((len(trajs[i].tokens),), i, dtype=torch.long) for i in group]).to(self.device),
                    num_tokens=num_tokens,
                    num_seqs=num_seqs,
                    behav_logp=cat([trajs[i].logprobs for i in group]),
                    ref_logp=cat([ref_logprobs[i] for i in group]) if ref_logprobs is not None else None,
                    entropy=torch.cat(ents) if self.acfg.entropy_coef > 0 else torch.cat(ents).detach(),
                    max_len=float(max_len),
                )
                loss, m = loss_fn(inp, self.acfg)
                (loss * self.world_size).backward()  # ranks' gradients are averaged: see train/distributed.py
                per_mb.append(m)
                if epoch == 0:
                    gap.append(mismatch_metrics(logp.detach(), inp))
                loss_sum += m["loss/total"]
            gnorm = self._optimizer_step(loss_sum)
        self.version += 1
        out = self.dist.reduce_metrics(per_mb) if self.dist else reduce_metrics(per_mb)  # metrics of the last epoch
        out.update(self.dist.reduce_metrics(gap) if self.dist else reduce_metrics(gap))
        out["grad/norm"] = gnorm
        out.update(self.guard.metrics())
        out["lr"] = self.scheduler.get_last_lr()[0]
        out["perf/train_seconds"] = time.perf_counter() - t0
        out["perf/train_tokens"] = float(sum(len(t.tokens) for t in trajs))
        return out

    # ------------------------------------------------------------------ SFT step
    def sft_step(self, examples: list[tuple[list[int], list[bool]]]) -> dict[str, float]:
        """Cross-entropy on masked (assistant) tokens, averaged over all masked tokens of the batch."""
        num_tokens = float(sum(sum(m) for _, m in examples))
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for group, mb in self.micro_batches([x for x, _ in examples]):
            lps, _ = self.forward(mb)
            mask = torch.cat([torch.tensor(examples[i][1], dtype=torch.float32) for i in group]).to(self.device)
            loss = -(torch.cat(lps) * mask).sum() / max(num_tokens, 1.0)
            (loss * self.world_size).backward()
            total += float(loss.detach())
        total = self.dist.sum(total) if self.dist else total
        gnorm = self._optimizer_step(total)
        self.version += 1
        return {"loss/sft": total, "grad/norm": gnorm, "lr": self.scheduler.get_last_lr()[0], **self.guard.metrics()}

    # ------------------------------------------------------------------ the NaN guard
    def _optimizer_step(self, loss: float) -> float:
        """The guarded optimizer step (`NanGuard.step`); with data parallelism decided on the all-reduced
        gradient norm alone, the same on every rank. Returns the gradient norm (before clipping)."""
        return self.guard.step(self.model.parameters(), self.optimizer, self.scheduler, self.tcfg.grad_clip, loss,
                               norm_only=self.dist is not None)


    # ------------------------------------------------------------------ weights & state
    def export_weights(self) -> dict[str, torch.Tensor]:
        if self.dist:  # full weights on rank 0, {} elsewhere
            self.dist.share("export_weights")
            return self.dist.export(self.model)
        from thinkrl.models.lora import merged_state_dict  # plain models: their own state dict

        return merged_state_dict(self.model)

    def state_dict(self) -> dict:
        if self.dist:
            self.dist.share("state_dict")
        optim = self.dist.optimizer_state(self.model, self.optimizer) if self.dist else self.optimizer.state_dict()
        return {"optimizer": optim, "scheduler": self.scheduler.state_dict(), "version": self.version,
                **self.guard.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Data parallel: called on rank 0 after its model got the checkpoint's weights; every rank gets both."""
        if self.dist:
            (state,) = self.dist.share("load_state_dict", state)
            self.dist.load(self.model, self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.version = state["version"]
        self.guard.load_state_dict(state)
