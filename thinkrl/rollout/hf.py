"""A simple engine over Hugging Face `generate`: correct for any causal LM, not fast.

It is the reference the fast embedded engine is measured against, and a fallback for models the
embedded engine does not support. It generates with the module it is given (the trainer's own, so a load
copies nothing). Concurrent `generate` calls are gathered into one batch; a pause waits for the batch that
is running (HF generate runs whole sequences), so it only suits loops that load weights between batches.
"""
from __future__ import annotations

import asyncio

import torch

from thinkrl.rollout.base import EngineCaps, InferenceEngine, check_sequences, register_engine
from thinkrl.rollout.forward import hf_token_logprobs
from thinkrl.rollout.weights import tensors_of
from thinkrl.types import Generation, SamplingParams

_DEFAULT = SamplingParams()  # one object: calls without params batch together


@register_engine("hf")
class HFEngine(InferenceEngine):
    caps = EngineCaps(in_process=True, pause_modes=("in_place",), transports=("memory", "disk"),
                      shares_trainer_weights=True, score=True)

    def __init__(self, model, tokenizer, version: int = 0, max_batch: int = 512, pause_mode: str = "auto"):
        super().__init__(version, pause_mode)
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self._pending: list[tuple[list[int], SamplingParams, int, asyncio.Future]] = []
        self._flush_scheduled = False
        self._paused = False

    @classmethod
    def from_config(cls, cfg, model, tokenizer, version: int = 0) -> HFEngine:
        return cls(model, tokenizer, version=version, pause_mode=cfg.rollout.pause_mode)

    # ------------------------------------------------------------------ sync API
    @torch.inference_mode()
    def generate_batch(self, prompts: list[list[int]], params: SamplingParams | None = None,
                       n: int = 1) -> list[list[Generation]]:
        """The batch runs here directly (it is what the async API gathers concurrent calls into)."""
        params = params or _DEFAULT
        flat = [p for p in prompts for _ in range(n)]
        outs: list[Generation] = []
        for i in range(0, len(flat), self.max_batch):
            outs += self._run(flat[i : i + self.max_batch], params)
        return [outs[i * n : (i + 1) * n] for i in range(len(prompts))]

    def _run(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        model, tok = self.model, self.tokenizer
        device = next(model.parameters()).device
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        att = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding
            ids[i, width - len(p) :] = torch.tensor(p)
            att[i, width - len(p) :] = 1
        stop_ids = list(params.stop_token_ids) or [tok.eos_token_id]
        kwargs = dict(
            max_new_tokens=params.max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad,
            output_logits=True, return_dict_in_generate=True,
        )
        if params.temperature > 0:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=tok)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        was_training = model.training
        model.eval()
        out = model.generate(input_ids=ids.to(device), attention_mask=att.to(device), **kwargs)
        model.train(was_training)
        new = out.sequences[:, width:].cpu()
        logits = torch.stack(out.logits, dim=1).float()  # [B, T, V] raw logits
        full = torch.log_softmax(logits, dim=-1)
        logp = full.gather(-1, new[:, : logits.shape[1], None].to(logits.device))[..., 0].cpu()
        top = None
        if params.top_logprobs > 0:  # the N most likely tokens at each position, only when asked
            tv, ti = full.topk(min(params.top_logprobs, full.shape[-1]), -1)
            top = [[list(zip(i, v)) for i, v in zip(ri, rv)] for ri, rv in zip(ti.tolist(), tv.tolist())]
        gens = []
        stops = set(stop_ids)
        for i in range(len(prompts)):
            toks = new[i].tolist()
            finish, end = "length", len(toks)
            for t, x in enumerate(toks):
                if x in stops:
                    finish, end = "stop", t + 1
                    break
            if params.stop:  # cut at the first stop string (HF stops the batch, not each row)
                text = ""
                for t, x in enumerate(toks[:end]):
                    text += tok.decode([x])
                    if any(st in text for st in params.stop):
                        finish, end = "stop", t + 1
                        break
            toks = toks[:end]
            gens.append(Generation(tokens=toks, logprobs=logp[i, :end].tolist(), versions=[self.version] * end,
                                   finish=finish, top_logprobs=top[i][:end] if top is not None else None))
        return gens

    @torch.inference_mode()
    def score(self, sequences: list[list[int]]) -> list[list[float]]:
        """Teacher-forced log-probs (InferenceEngine.score): the module's forward over the right-padded batch,
        in eval mode (chunks of at most max_batch sequences)."""
        model = self.model
        cfg = model.config
        seqs = check_sequences(sequences, cfg.vocab_size, getattr(cfg, "max_position_embeddings", None) or 1 << 30)
        was_training = model.training
        model.eval()
        out = []
        try:
            for i in range(0, len(seqs), self.max_batch):
                out += [[0.0] + lp.tolist() for lp in hf_token_logprobs(model, seqs[i: i + self.max_batch])]
        finally:
            model.train(was_training)
        return out

    # ------------------------------------------------------------------ async API
    async def generate(self, input_ids: list[int], params: SamplingParams | None = None,
                       n: int = 1) -> list[Generation]:
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((list(input_ids), params or _DEFAULT, n, fut))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self._flush()))
        return await fut

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # let every concurrent caller enqueue first
        while self._paused:
            await asyncio.sleep(0.01)
        pending, self._pending, self._flush_scheduled = self._pending, [], False
        by_params: dict[int, list] = {}
        for item in pending:
            by_params.setdefault(id(item[1]), []).append(item)
        for items in by_params.values():
            try:
                ns = {it[2] for it in items}
                if len(ns) == 1:
                    res = self.generate_batch([it[0] for it in items], items[0][1], n=ns.pop())
                else:
                    res = [self.generate_batch([it[0]], it[1], n=it[2])[0] for it in items]
                for it, r in zip(items, res):
                    it[3].set_result(r)
            except Exception as e:  # hand the error to every waiting caller
                for it in items:
                    if not it[3].done():
                        it[3].set_exception(e)

    # ------------------------------------------------------------------ control
    def pause(self, mode: str | None = None) -> None:
        self.resolve_pause_mode(mode)
        self._paused = True

    def resume(self) -> None:
        self._paused = False

    def update_weights(self, src, version: int) -> None:
        """A state dict, another module, or a safetensors path; the engine's own module loads nothing."""
        if src is not self.model:
            missing, unexpected = self.model.load_state_dict(tensors_of(src), strict=False)
            tied = {"lm_head.weight"} if getattr(self.model.config, "tie_word_embeddings", False) else set()
            bad = list(unexpected) + sorted(set(missing) - tied)
            if bad:
                raise ValueError(f"update_weights: {'unknown' if unexpected else 'missing'} parameter {bad[0]!r}")
        self.version = version
