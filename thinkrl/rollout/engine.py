"""EmbeddedEngine: an in-process inference engine for RL rollouts (pure PyTorch, any device).

    engine = EmbeddedEngine(hf_model, tokenizer, max_seqs=256)
    gens = await engine.generate(prompt_ids, SamplingParams(max_new_tokens=128), n=8)   # asyncio, many in flight
    groups = engine.generate_batch(prompts, params, n=8)                                 # synchronous

How it works (nano-vllm style, one scheduler):
- A worker thread (started on demand, gone after 1 s idle) runs `_step()` while there is work. Each step
  admits waiting sequences into free KV slots (budget: `max_seqs` slots and `max_tokens` reserved
  prompt + max_new tokens; the rest queue), prefills the new prompts in one batched `extend` (the n samples of
  a prompt share one prefill, whose KV is copied to their n slots; prompts sharing a prefix with a recent prompt
  reuse its KV from the prefix cache), then decodes one token for every running sequence in one batched
  forward (continuous batching: finished sequences leave, waiting ones join, every step). When the queue is
  empty and half the slot range is holes, running sequences are compacted into the low slots.
- The forward (forward.LeanRunner) is a compact Llama/Qwen2/Mistral implementation over a slot KV cache
  (kvcache.SlotKVCache); other models run on forward.HFRunner (the HF model on whole sequences: slow, correct).
- Sampling happens on device for the whole batch (sampling.sample); a sequence's randomness is a pure function
  of (seed, sample index, token index), so a seeded request is reproducible whatever runs beside it.
- Log-probs are log_softmax of the raw logits (temperature 1), whatever the sampling temperature.
- pause() stops at a token boundary; update_weights() copies weights in place and flushes the prefix cache;
  resume() continues. In-flight sequences keep the KV computed with the old weights (partial rollout): only new
  tokens use the new weights, and every token carries the version that produced it. pause(mode="abort") or
  abort_all() ends in-flight requests with their partial output and finish="abort".
- Stop: stop_token_ids (plus the model's EOS ids when stop_at_eos) and stop strings (needs a tokenizer); the
  token that completes a stop is kept in the output. finish is "stop", "length" (max_new_tokens) or "abort".
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import logging
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from thinkrl.rollout.base import register_engine
from thinkrl.rollout.forward import HFRunner, LeanRunner, lean_unsupported
from thinkrl.rollout.kvcache import PrefixCache, SlotState
from thinkrl.rollout.sampling import sample
from thinkrl.types import Generation, SamplingParams

log = logging.getLogger(__name__)
_M32 = 0xFFFFFFFF


@dataclass(eq=False)
class _Request:
    prompt: list[int]
    params: SamplingParams
    on_done: Callable[[Any], None]
    stop_ids: list[int]
    seqs: list[_Seq] = field(default_factory=list)
    left: int = 0
    window: int = 0  # tokens decoded to look for stop strings
    cancelled: bool = False

    @property
    def need(self) -> int:  # reserved KV positions per sequence
        return len(self.prompt) + self.params.max_new_tokens


@dataclass(eq=False)
class _Seq:
    req: _Request
    seed: int
    slot: int = -1
    t0: int = 0  # current position = t0 + engine ticks
    marks: list = field(default_factory=list)  # [(token index, version)] where the version changes
    text: list | None = None  # generated ids, kept only to check stop strings
    result: Generation | None = None


def _resolve(fut: asyncio.Future, res) -> None:
    if not fut.done():
        fut.set_exception(res) if isinstance(res, BaseException) else fut.set_result(res)


@register_engine("embedded")
class EmbeddedEngine:
    def __init__(self, model, tokenizer=None, *, max_seqs: int = 256, max_len: int | None = None,
                 max_tokens: int | None = None, prefix_cache_tokens: int = 65536, max_prefill_tokens: int = 8192,
                 dtype: torch.dtype | str = torch.float32, device: str | torch.device | None = None,
                 forward: str = "auto", stop_at_eos: bool = True, version: int = 0):
        if isinstance(model, str):
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained(model)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        device = torch.device(device) if device is not None else next(model.parameters()).device
        cfg = model.config
        self.max_len = getattr(cfg, "max_position_embeddings", 0) if max_len is None else max_len
        self.max_seqs = max_seqs
        self.max_tokens = max_seqs * self.max_len if max_tokens is None else max_tokens
        for name, val in (("max_seqs", max_seqs), ("max_len", self.max_len), ("max_tokens", self.max_tokens),
                          ("max_prefill_tokens", max_prefill_tokens)):
            if val < 1:
                raise ValueError(f"EmbeddedEngine: {name} must be >= 1, got {val}")
        if forward not in ("auto", "lean", "hf"):
            raise ValueError(f"EmbeddedEngine: forward must be 'auto', 'lean' or 'hf', got {forward!r}")
        reason = lean_unsupported(model)
        if forward == "auto" and reason:
            log.warning("EmbeddedEngine: using the slow Hugging Face fallback forward: %s", reason)
        runner_cls = HFRunner if forward == "hf" or (forward == "auto" and reason) else LeanRunner
        self.runner = runner_cls(model, max_seqs, self.max_len, dtype, device)
        self.tokenizer, self.device, self.version = tokenizer, device, version
        self.max_prefill_tokens = max_prefill_tokens
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None) or cfg.eos_token_id
        eos = ([] if eos is None else [eos] if isinstance(eos, int) else list(eos))
        self.eos_ids = sorted(set(eos)) if stop_at_eos else []
        self._prefix = PrefixCache(prefix_cache_tokens)
        self.st = SlotState(max_seqs, self.max_len, device)  # per-slot state, on device
        self._ar = torch.arange(max_seqs, device=device)
        self._waiting: deque[_Seq] = deque()  # scheduler state, on the host
        self._running: dict[int, _Seq] = {}
        self._free = list(range(max_seqs))
        self._reserved = self._ticks = self._n_filtered = self._n_scaled = self._n_stopstr = 0
        self.peak_running = self.compactions = 0
        self._cv = threading.Condition()
        self._step_lock = threading.RLock()
        self._paused = self._closed = self._cancel_pending = False
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- public API
    async def generate(self, input_ids: list[int], params: SamplingParams | None = None,
                       n: int = 1) -> list[Generation]:
        """Sample n continuations of one prompt; many calls may be in flight at once."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def on_done(res):
            try:
                loop.call_soon_threadsafe(_resolve, fut, res)
            except RuntimeError:  # the event loop is gone
                pass

        req = self._request(input_ids, params, n, on_done)
        self._enqueue([req])
        try:
            return await fut
        except asyncio.CancelledError:
            self._cancel(req)
            raise

    def generate_batch(self, prompts: list[list[int]], params: SamplingParams | None = None,
                       n: int = 1) -> list[list[Generation]]:
        """Synchronous: n samples for each prompt, all batched together. Blocks while the engine is paused."""
        futs = [concurrent.futures.Future() for _ in prompts]
        done = lambda f: lambda r: f.set_exception(r) if isinstance(r, BaseException) else f.set_result(r)  # noqa: E731
        self._enqueue([self._request(p, params, n, done(f)) for p, f in zip(prompts, futs)])  # all or none
        return [f.result() for f in futs]

    def pause(self, mode: str = "wait") -> None:
        """Stop at the next token boundary. mode="wait": in-flight requests wait for resume();
        mode="abort": they end now with their partial output and finish="abort"."""
        if mode not in ("wait", "abort"):
            raise ValueError(f"pause: mode must be 'wait' or 'abort', got {mode!r}")
        with self._cv:
            self._paused = True
        with self._step_lock:  # a running step finishes first
            if mode == "abort":
                self.abort_all()

    def resume(self) -> None:
        with self._cv:
            self._paused = False
            self._wake()

    def abort_all(self) -> None:
        """End every waiting and running request now: partial outputs, finish="abort"."""
        with self._step_lock, torch.inference_mode():
            done = self._abort()
        self._deliver(done)

    def update_weights(self, src, version: int) -> None:
        """Copy weights in place (a state dict or an nn.Module with the same parameter names) at a token
        boundary; later tokens are tagged `version`. The prefix cache is flushed; in-flight KV is kept."""
        sd = src.state_dict() if isinstance(src, torch.nn.Module) else src
        if not isinstance(sd, Mapping):
            raise ValueError(f"update_weights: src must be a state dict or an nn.Module, got {type(src).__name__}")
        with self._step_lock, torch.inference_mode():
            self.runner.load_state_dict(sd)
            self._prefix.clear()
            gens = self.st.gen.tolist()
            for slot, seq in self._running.items():
                seq.marks.append((gens[slot], version))
            self.version = version

    def stats(self) -> dict:
        return {"running": len(self._running), "waiting": len(self._waiting), "peak_running": self.peak_running,
                "prefix_hits": self._prefix.hits, "prefix_hit_tokens": self._prefix.hit_tokens,
                "compactions": self.compactions,
                "kv_bytes": getattr(getattr(self.runner, "cache", None), "nbytes", 0)}

    def close(self) -> None:
        """Stop the worker thread (requests still in flight are aborted)."""
        self.abort_all()
        with self._cv:
            self._closed, thread = True, self._thread
            self._cv.notify_all()
        if thread is not None:
            thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---------------------------------------------------------------- submission
    def _request(self, prompt, params: SamplingParams | None, n: int, on_done) -> _Request:
        """Validate one request (ValueError naming the bad field) and build its n sequences."""
        prompt, params = [int(t) for t in prompt], params or SamplingParams()
        vocab = self.runner.vocab_size
        if not prompt or min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"input_ids: need a non-empty list of token ids in [0, {vocab})")
        checks = [("n", n >= 1), ("max_new_tokens", params.max_new_tokens >= 1),
                  ("temperature", params.temperature >= 0), ("top_p", 0 < params.top_p <= 1),
                  ("top_k", params.top_k >= 0)]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{name}: invalid value {getattr(params, name, n)!r}")
        if params.stop and self.tokenizer is None:
            raise ValueError("SamplingParams.stop: stop strings need an engine built with a tokenizer")
        req = _Request(prompt, params, on_done, sorted(set(params.stop_token_ids) | set(self.eos_ids)))
        if req.need > self.max_len:
            raise ValueError(f"SamplingParams.max_new_tokens: prompt ({len(prompt)}) + max_new_tokens "
                             f"({params.max_new_tokens}) exceeds the engine's max_len ({self.max_len})")
        if req.need > self.max_tokens:
            raise ValueError(f"SamplingParams.max_new_tokens: one sequence needs {req.need} tokens, more than "
                             f"max_tokens ({self.max_tokens})")
        req.window = max((len(s) for s in params.stop), default=0) + 8
        # unseeded requests draw their seed from torch's global RNG: torch.manual_seed(run.seed) and the
        # RNG state saved in checkpoints then make sampling (and resume) reproducible
        base = int(torch.randint(0, 2**31 - 1, (1,)).item()) if params.seed is None else params.seed & _M32
        req.seqs = [_Seq(req, (base ^ ((i + 1) * 0x9E3779B9)) & _M32) for i in range(n)]
        req.left = n
        return req

    def _enqueue(self, reqs: list[_Request]) -> None:
        with self._cv:
            if self._closed:
                raise RuntimeError("EmbeddedEngine is closed")
            for req in reqs:
                self._waiting.extend(req.seqs)
            self._wake()

    def _wake(self) -> None:  # with self._cv held
        if self._thread is None and not self._paused and (self._waiting or self._running):
            self._thread = threading.Thread(target=self._loop, name="thinkrl-engine", daemon=True)
            self._thread.start()
        self._cv.notify_all()

    def _cancel(self, req: _Request) -> None:
        with self._cv:
            req.cancelled = self._cancel_pending = True
            self._waiting = deque(s for s in self._waiting if s.req is not req)

    # ---------------------------------------------------------------- worker
    def _loop(self) -> None:
        """The worker: steps while there is work; exits after 1 s idle (so a dropped engine can be freed)."""
        idle = lambda: self._closed or self._paused or not (self._waiting or self._running)  # noqa: E731
        while True:
            with self._cv:
                while idle():
                    if self._closed or (not self._cv.wait(timeout=1.0) and idle()):
                        self._thread = None
                        return
            with self._step_lock, torch.inference_mode():
                if self._paused:
                    continue
                try:
                    done = self._step()
                except Exception as e:  # fail every request rather than hang them
                    log.exception("EmbeddedEngine step failed")
                    done = self._abort(error=e)
            self._deliver(done)

    def _deliver(self, done: list) -> None:
        for req, res in done:
            req.on_done(res)

    def _step(self) -> list:
        done: list = []
        if self._cancel_pending:
            self._cancel_pending = False
            self._release([s for s in self._running.values() if s.req.cancelled])
        admitted = self._admit()
        if admitted:
            self._prefill(admitted, done)
        if self._running:
            self._decode(done)
        return done

    def _admit(self) -> list[_Seq]:
        out, new_reqs, budget = [], set(), self.max_prefill_tokens
        with self._cv:
            while self._waiting and self._free:
                seq = self._waiting[0]
                if self._running and self._reserved + seq.req.need > self.max_tokens:
                    break
                if seq.req not in new_reqs:
                    if new_reqs and len(seq.req.prompt) > budget:
                        break
                    new_reqs.add(seq.req)
                    budget -= len(seq.req.prompt)
                self._waiting.popleft()
                seq.slot = heapq.heappop(self._free)
                self._reserved += seq.req.need
                self._running[seq.slot] = seq
                out.append(seq)
        self.peak_running = max(self.peak_running, len(self._running))
        return out

    def _prefill(self, seqs: list[_Seq], done: list) -> None:
        groups: dict[_Request, list[_Seq]] = {}
        for s in seqs:
            groups.setdefault(s.req, []).append(s)
        self.runner.ensure(max(s.slot for s in seqs) + 1, max(s.req.need for s in seqs))  # no regrowth later
        jobs = []  # (suffix length, request, leader slot, start)
        for req, ss in groups.items():
            hit, saved = self._prefix.lookup(req.prompt)
            if hit:
                self.runner.load(saved, ss[0].slot, hit)
            jobs.append((len(req.prompt) - hit, req, ss[0].slot, hit))
        jobs.sort(key=lambda j: j[0])
        rows: dict[_Request, torch.Tensor] = {}
        i = 0
        while i < len(jobs):  # chunks of at most max_prefill_tokens padded tokens
            j = i + 1
            while j < len(jobs) and (j + 1 - i) * jobs[j][0] <= self.max_prefill_tokens:
                j += 1
            chunk = jobs[i:j]
            logits = self.runner.extend([c[2] for c in chunk], [c[1].prompt[c[3]:] for c in chunk],
                                        [c[3] for c in chunk])
            rows.update({c[1]: logits[k] for k, c in enumerate(chunk)})
            i = j
        for req, ss in groups.items():
            P = len(req.prompt)
            self.runner.copy(ss[0].slot, [s.slot for s in ss[1:]], P)
            if self._prefix.max_tokens > 0:
                self._prefix.store(req.prompt, self.runner.save(ss[0].slot, P))
        # per-slot sampling state, then the first token of every new sequence
        for s in seqs:
            s.t0, s.marks = len(s.req.prompt) - self._ticks, [(0, self.version)]
            s.text = [] if s.req.params.stop else None
            self._n_filtered += s.req.params.top_k > 0 or s.req.params.top_p < 1
            self._n_scaled += s.req.params.temperature != 1
            self._n_stopstr += s.text is not None
        idx = torch.tensor([s.slot for s in seqs], device=self.device)
        ps = [s.req.params for s in seqs]
        self.st.assign(idx, [s.req.stop_ids for s in seqs], [p.max_new_tokens for p in ps],
                       pos=[len(s.req.prompt) for s in seqs], seed=[s.seed for s in seqs],
                       temp=[p.temperature for p in ps], top_p=[p.top_p for p in ps], top_k=[p.top_k for p in ps])
        self._emit(idx, torch.stack([rows[s.req] for s in seqs]), done)

    def _decode(self, done: list) -> None:
        hi = max(self._running) + 1
        length = max(s.t0 for s in self._running.values()) + self._ticks + 1
        st, active = self.st, self.st.active[:hi]
        logits = self.runner.decode(hi, st.tok[:hi], st.pos[:hi], length)
        st.pos[:hi] += active
        self._ticks += 1
        self._emit(self._ar[:hi], logits, done, active, rows=slice(0, hi))
        if not self._waiting and self._running and hi > max(2 * len(self._running), 8):
            self._compact()

    def _emit(self, idx: torch.Tensor, logits: torch.Tensor, done: list, active: torch.Tensor | None = None,
              rows: slice | None = None) -> None:
        """Sample the next token of slots `idx` (`rows`: the same as a slice, to read state without gathers),
        record it, and finish the sequences that stop."""
        st, r = self.st, idx if rows is None else rows
        g = st.gen[r]
        tok, lp = sample(logits, st.temp[r], st.top_p[r], st.top_k[r], st.u[r].gather(1, g[:, None])[:, 0],
                         self._n_filtered > 0, plain=self._n_scaled == 0)
        st.out_tok[idx, g], st.out_lp[idx, g], st.tok[r] = tok, lp, tok
        g = g + (1 if active is None else active)
        st.gen[r] = g
        stop = (st.stop_tab[r] == tok[:, None]).any(1)
        fin = stop | (g >= st.max_new[r])
        if active is not None:
            fin &= active
        hits = self._stop_strings(idx, tok) if self._n_stopstr else set()
        rows = fin.nonzero()[:, 0]
        ended = dict(zip(*torch.stack([idx[rows], stop[rows].long()]).tolist()))
        ended.update({slot: 1 for slot in hits})
        gens = st.gen.tolist() if ended else []
        for slot, is_stop in ended.items():
            self._finish(self._running[slot], "stop" if is_stop else "length", gens[slot], done)

    def _stop_strings(self, idx: torch.Tensor, tok: torch.Tensor) -> set[int]:
        hits = set()
        for slot, t in zip(idx.tolist(), tok.tolist()):
            seq = self._running.get(slot)
            if seq is not None and seq.text is not None:
                seq.text.append(t)
                tail = self.tokenizer.decode(seq.text[-seq.req.window:])
                if any(s in tail for s in seq.req.params.stop):
                    hits.add(slot)
        return hits

    def _finish(self, seq: _Seq, reason: str, g: int, done: list) -> None:
        tokens = self.st.out_tok[seq.slot, :g].tolist()
        versions, marks = [], seq.marks + [(g, None)]
        for (start, v), (end, _) in zip(marks, marks[1:]):
            versions += [v] * max(0, end - max(start, len(versions)))
        seq.result = Generation(tokens, self.st.out_lp[seq.slot, :g].tolist(), versions, reason)
        self._release([seq])
        req = seq.req
        req.left -= 1
        if req.left == 0 and not req.cancelled:
            done.append((req, [s.result for s in req.seqs]))

    def _release(self, seqs: list[_Seq]) -> None:
        if not seqs:
            return
        self.st.clear(torch.tensor([s.slot for s in seqs], device=self.device))
        for s in seqs:
            del self._running[s.slot]
            heapq.heappush(self._free, s.slot)
            self._reserved -= s.req.need
            self._n_filtered -= s.req.params.top_k > 0 or s.req.params.top_p < 1
            self._n_scaled -= s.req.params.temperature != 1
            self._n_stopstr -= s.text is not None
            s.slot = -1

    def _compact(self) -> None:
        """Move the running sequences to slots [0, n) so that decode batches stop paying for holes."""
        n = len(self._running)
        self.compactions += 1
        movers = sorted(s for s in self._running if s >= n)
        holes = [s for s in range(n) if s not in self._running]
        if not movers:
            return
        src, dst = (torch.tensor(x, dtype=torch.long, device=self.device) for x in (movers, holes))
        self.runner.move(src, dst, max(s.t0 for s in self._running.values()) + self._ticks)
        self.st.move(src, dst)
        for a, b in zip(movers, holes):
            seq = self._running.pop(a)
            seq.slot = b
            self._running[b] = seq
        self._free = sorted(set(range(self.max_seqs)) - set(self._running))

    def _abort(self, error: BaseException | None = None) -> list:
        """Finish everything now ("abort", partial output) or, with `error`, fail every request."""
        done: list = []
        gens = self.st.gen.tolist()
        with self._cv:
            waiting, self._waiting = list(self._waiting), deque()
        for seq in list(self._running.values()) + waiting:
            if seq.slot >= 0:
                self._finish(seq, "abort", gens[seq.slot], done)
            else:
                seq.result = Generation([], [], [], "abort")
                seq.req.left -= 1
                if seq.req.left == 0 and not seq.req.cancelled:
                    done.append((seq.req, [s.result for s in seq.req.seqs]))
        if error is not None:
            done = [(req, error) for req, _ in done]
        return done
