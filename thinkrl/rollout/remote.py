"""RemoteEngine: the InferenceEngine contract over HTTP inference servers (SGLang native API or vLLM's OpenAI API).

    engine = RemoteEngine(["http://10.0.0.5:30000", "http://10.0.0.6:30000"], api="sglang", max_concurrency=64)
    gens = await engine.generate(prompt_ids, SamplingParams(max_new_tokens=512), n=8)
    engine.load_weights("/shared/ckpt/step_10", version=10)        # a directory every server can read

- Concurrency: at most `max_concurrency` sequences in flight per server (the n samples of a request count n), so
  servers are not pushed into KV-cache preemption; requests beyond that wait in the client.
- Routing: least loaded server; the n samples of a group and the resumed parts of a request stay on one server
  (sticky) while it is alive, so its prefix cache is hit.
- Failures: connection errors and timeouts mark a server dead for `dead_cooldown` s and the request fails over
  to another; 5xx/429 answers are retried with exponential backoff; other 4xx answers raise at once.
- Partial rollouts: a sample that ends with finish "abort" (a server paused with mode=abort for a weight update)
  is resumed: prompt + tokens so far are sent again with the rest of the token budget, and the parts are joined
  (tokens, log-probs, versions).
- Scoring: score(sequences) gives each token's log-prob on the servers' weights (a remote teacher): SGLang's
  prompt log-probs (/generate, max_new_tokens 0, logprob_start_len 0) or vLLM's (/v1/completions, echo,
  max_tokens 0, prompt_logprobs 0), with the same retries and failover.
- Versions: each token carries the server-reported version (thinkrl servers report it per token, SGLang per
  response as meta_info.weight_version), else the client's version when the response arrived.
- load_weights(path, version): pause() is /pause_generation {mode} on every live server, update_weights()
  /update_weights_from_disk, resume() /continue_generation. A server that missed an update is brought up to
  date before its next request.
  vLLM (api="openai"; found when /pause_generation is a 404) needs VLLM_SERVER_DEV_MODE=1 and gets its dev
  endpoints instead: /pause?mode=..., /collective_rpc reload_weights {weights_path}, /reset_prefix_cache,
  /update_weight_version, /resume.
Request bodies and answer parsing for both APIs are in thinkrl/rollout/wire.py.
HTTP: httpx.AsyncClient (keep-alive pools, one per event loop; the OpenAI SDK's client too). A transport error
(refused, reset, a connection dropped mid-answer, a timeout) counts as the server being down.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx

from thinkrl.errors import RunFault
from thinkrl.rollout.base import EngineCaps, InferenceEngine, register_engine, run_sync
from thinkrl.rollout.weights import save_safetensors
from thinkrl.rollout.wire import APIS, WireError, generate_request, parse_generations, parse_scores, score_request
from thinkrl.types import Generation, SamplingParams

log = logging.getLogger(__name__)
# vLLM's /pause modes for ours: "keep" freezes in-flight requests with their KV cache (SGLang's in_place); for
# retract the frozen requests' KV is dropped after the reload (/reset_prefix_cache?reset_running_requests=true)
# and recomputed with the new weights on resume.
VLLM_PAUSE = {"abort": "abort", "in_place": "keep", "retract": "keep"}
DOWN = (OSError, asyncio.TimeoutError, httpx.TransportError)  # the server is unreachable or dropped the request


def _json(r: httpx.Response):
    """The body as JSON (None when empty)."""
    return json.loads(r.content) if r.content.strip() else None


def _error_message(r: httpx.Response) -> str:
    """The server's error message: OpenAI style {"error": {"message"}}, SGLang style {"message"}, or text."""
    try:
        obj = _json(r)
    except ValueError:
        obj = None
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if isinstance(err, str):
            return err
        if "message" in obj:
            return str(obj["message"])
    return r.content[:300].decode("utf-8", "replace")


class RemoteError(RunFault):
    """A server answered with an error that retrying will not fix, or every retry failed (a run stops on it with
    this one line; its checkpoints stay)."""


class _Retry(Exception):
    """A transient answer (5xx, 429, 408): retry, without marking the server dead."""


class _NotFound(RemoteError):
    """A control endpoint this server does not have (HTTP 404)."""


@dataclass(eq=False)
class _Server:
    url: str
    limit: int
    version: int
    load: int = 0  # sequences in flight
    dead_until: float = 0.0
    model: str | None = None  # OpenAI API: served model name
    control: str | None = None  # weight-update endpoints: "sglang" (also thinkrl serve) or "vllm"; None: not known yet
    stats: dict = field(default_factory=lambda: {"requests": 0, "failures": 0})


@dataclass(eq=False)
class _LoopState:  # asyncio objects are bound to one event loop: one of these per loop
    client: httpx.AsyncClient
    cond: asyncio.Condition
    active: int = 0


@register_engine("remote")
class RemoteEngine(InferenceEngine):
    # abort first: SGLang cannot flush its cache for a weight load while in_place requests hold it
    caps = EngineCaps(in_process=False, pause_modes=("abort", "in_place", "retract"), transports=("disk",),
                      mid_sequence_update=True, score=True)

    def __init__(self, servers: list[str], api: str = "sglang", max_concurrency: int = 64, *, tokenizer=None,
                 version: int = 0, api_key: str | None = None, request_timeout: float = 3600.0,
                 max_retries: int = 3, retry_backoff: float = 0.5, dead_cooldown: float = 30.0, max_resumes: int = 8,
                 pause_mode: str = "auto", weights_dir: str | None = None, model_name: str | None = None):
        if not servers:
            raise ValueError("rollout.servers: empty; give the servers' base URLs, e.g. [http://127.0.0.1:30000]")
        for url in servers:
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise ValueError(f"rollout.servers: {url!r} is not an http:// or https:// URL")
        if api not in APIS:
            raise ValueError(f"rollout.server_api: unknown value {api!r}; valid: {', '.join(APIS)}")
        if max_concurrency < 1:
            raise ValueError(f"rollout.max_concurrency: must be >= 1, got {max_concurrency}")
        if request_timeout <= 0 or max_retries < 0:
            raise ValueError("request_timeout must be > 0 and max_retries >= 0")
        super().__init__(version, pause_mode)
        self.servers = [_Server(u.rstrip("/"), max_concurrency, version) for u in servers]
        self.api, self.tokenizer = api, tokenizer
        self.api_key = api_key or os.environ.get("THINKRL_SERVER_API_KEY") or None
        self.request_timeout, self.max_retries, self.retry_backoff = request_timeout, max_retries, retry_backoff
        self.dead_cooldown, self.max_resumes = dead_cooldown, max_resumes
        self._mode = self.pause_mode  # the mode of the pause in progress (vLLM's reload depends on it)
        self._held: list[_Server] = []  # the servers the pause in progress paused
        self.weights_dir, self.model_name = weights_dir, model_name
        self.counters = {"requests": 0, "retries": 0, "failovers": 0, "resumes": 0}
        self._weights: str | None = None  # the path of the current version's weights (for catch-up)
        self._sticky: dict[str, _Server] = {}
        self._loops: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @classmethod
    def from_config(cls, cfg, model=None, tokenizer=None, version: int = 0) -> RemoteEngine:
        """From cfg.rollout: servers, server_api, max_concurrency, request_timeout, max_retries, pause_mode,
        weights_dir, server_api_key. `model` is not used: the servers load their own."""
        r = cfg.rollout
        return cls(list(r.servers), api=r.server_api, max_concurrency=r.max_concurrency, tokenizer=tokenizer,
                   version=version, request_timeout=r.request_timeout, max_retries=r.max_retries,
                   pause_mode=r.pause_mode, weights_dir=r.weights_dir or None, api_key=r.server_api_key or None)

    # ------------------------------------------------------------------------------------------ generation
    async def generate(self, input_ids: list[int], params: SamplingParams | None = None,
                       n: int = 1) -> list[Generation]:
        params = params or SamplingParams()
        if n < 1 or params.max_new_tokens < 1:
            raise ValueError(f"generate: need n >= 1 and max_new_tokens >= 1 (got {n}, {params.max_new_tokens})")
        prompt, key = [int(t) for t in input_ids], uuid.uuid4().hex
        try:
            gens = await self._request(prompt, params, n, key)
            return list(await asyncio.gather(*[self._complete(prompt, params, g, key) for g in gens]))
        finally:
            self._sticky.pop(key, None)

    async def _complete(self, prompt: list[int], params: SamplingParams, g: Generation, key: str) -> Generation:
        """Resume an aborted sample until it stops, reaches max_new_tokens, or max_resumes is spent."""
        for _ in range(self.max_resumes):
            left = params.max_new_tokens - len(g.tokens)
            if g.finish != "abort" or left <= 0:
                break
            if g.tokens and g.tokens[-1] in params.stop_token_ids:
                return replace(g, finish="stop")
            self.counters["resumes"] += 1
            [more] = await self._request(prompt + g.tokens, replace(params, max_new_tokens=left), 1, key)
            g = Generation(g.tokens + more.tokens, g.logprobs + more.logprobs, g.versions + more.versions, more.finish)
        if g.finish == "abort" and len(g.tokens) >= params.max_new_tokens:
            g = replace(g, finish="length")
        return g

    def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        st = self._loops.get(loop)
        if st is None:
            st = self._loops[loop] = _LoopState(self._client(), asyncio.Condition())
        elif st.client.is_closed:
            st.client = self._client()
        return st

    def _client(self) -> httpx.AsyncClient:
        """Keep-alive connections to the servers, for one event loop; requests are bounded by max_concurrency
        per server (not by the pool), and by request_timeout."""
        return httpx.AsyncClient(headers=self._auth(), timeout=httpx.Timeout(self.request_timeout, connect=30.0),
                                 limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
                                 trust_env=False)

    def _choose(self, key: str) -> _Server:
        now = time.monotonic()
        alive = [s for s in self.servers if s.dead_until <= now]
        sticky = self._sticky.get(key)
        if sticky is not None and sticky in alive:
            return sticky
        if not alive:  # all marked dead: probe the one that comes back first
            return min(self.servers, key=lambda s: s.dead_until)
        best = min(s.load / s.limit for s in alive)
        s = random.choice([s for s in alive if s.load / s.limit == best])
        self._sticky[key] = s
        return s

    async def _acquire(self, st: _LoopState, key: str, k: int) -> _Server:
        async with st.cond:
            while True:
                s = self._choose(key)
                if s.load + k <= s.limit or s.load == 0:
                    s.load += k
                    return s
                try:  # released slots notify; the timeout covers releases made on another event loop
                    await asyncio.wait_for(st.cond.wait(), 0.5)
                except asyncio.TimeoutError:
                    pass

    async def _release(self, st: _LoopState, s: _Server, k: int) -> None:
        s.load -= k
        async with st.cond:
            st.cond.notify_all()

    async def _request(self, prompt: list[int], params: SamplingParams, n: int, key: str) -> list[Generation]:
        """n generations for one prompt from one server, with retries and failover."""
        return await self._retrying(key, n, "generate", lambda c, s: self._call(c, s, prompt, params, n))

    async def _retrying(self, key: str, n: int, what: str, call):
        """`call(client, server)` (n sequences of load) on one server, with retries and failover."""
        st = self._state()
        st.active += 1
        try:
            last: Exception | None = None
            for attempt in range(self.max_retries + 1):
                k = min(n, self.servers[0].limit)
                s = await self._acquire(st, key, k)
                self.counters["requests"] += 1
                s.stats["requests"] += 1
                try:
                    if self._weights is not None and s.version != self.version:
                        await self._catch_up(st.client, s)
                    return await asyncio.wait_for(call(st.client, s), self.request_timeout)
                except DOWN as e:
                    s.dead_until, last = time.monotonic() + self.dead_cooldown, e
                    s.version = -1  # it may come back restarted with other weights: resend ours first
                    s.stats["failures"] += 1
                    self._sticky.pop(key, None)
                    others = any(o.dead_until <= time.monotonic() for o in self.servers)
                    log.warning("remote engine: %s failed (%s: %s); marked dead for %.0f s%s", s.url,
                                type(e).__name__, e, self.dead_cooldown, ", failing over" if others else "")
                    self.counters["failovers" if others else "retries"] += 1
                    if others:
                        continue
                except _Retry as e:
                    last = e
                    self.counters["retries"] += 1
                    self._sticky.pop(key, None)
                finally:
                    await self._release(st, s, k)
                if attempt < self.max_retries:
                    await asyncio.sleep(min(self.retry_backoff * 2 ** attempt, 10.0))
            if isinstance(last, DOWN) and all(o.dead_until > time.monotonic() for o in self.servers):
                raise RemoteError(f"{what} failed after {self.max_retries + 1} attempts: no server reachable "
                                  f"({', '.join(o.url for o in self.servers)}); last error: "
                                  f"{type(last).__name__}: {last}")
            raise RemoteError(f"{what} failed after {self.max_retries + 1} attempts: {type(last).__name__}: {last}")
        finally:
            st.active -= 1
            if st.active == 0:  # no request in flight on this loop: close idle connections with it
                await st.client.aclose()

    async def _call(self, client: httpx.AsyncClient, s: _Server, prompt, params: SamplingParams, n: int) -> list[Generation]:
        if self.api == "openai" and s.model is None:
            s.model = self.model_name or await self._model_of(client, s)
        path, body = generate_request(self.api, s.model, prompt, params, n)
        r = self._check(s, path, await client.post(s.url + path, json=body))
        return self._parsed(s, path, "answer", lambda: parse_generations(self.api, _json(r), n, self.version))

    def _parsed(self, s: _Server, path: str, what: str, parse):
        try:
            return parse()
        except WireError as e:
            raise RemoteError(f"{s.url}{path}: {e}") from None
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            raise RemoteError(f"{s.url}{path}: malformed {what} ({type(e).__name__}: {e})") from None

    # ------------------------------------------------------------------------------------------ scoring
    def score(self, sequences: list[list[int]]) -> list[list[float]]:
        """Teacher-forced log-probs (InferenceEngine.score) from the servers, in requests of at most
        max_concurrency sequences spread over them (retries and failover as generate). SGLang: /generate with
        max_new_tokens 0, logprob_start_len 0 (meta_info.input_token_logprobs); openai: /v1/completions with
        echo, max_tokens 0 and prompt_logprobs 0, as vLLM scores a prompt (choices[i].prompt_logprobs)."""
        seqs = [[int(t) for t in s] for s in sequences]
        if not all(seqs):
            raise ValueError("score: every sequence needs at least one token")
        k = self.servers[0].limit
        parts = [seqs[i: i + k] for i in range(0, len(seqs), k)]

        async def go():
            async def part(p):
                return await self._retrying(uuid.uuid4().hex, len(p), "score",
                                            lambda c, s: self._score_call(c, s, p))
            return [lp for res in await asyncio.gather(*[part(p) for p in parts]) for lp in res]

        return run_sync(go) if seqs else []

    async def _score_call(self, client: httpx.AsyncClient, s: _Server, seqs: list[list[int]]) -> list[list[float]]:
        if self.api == "openai" and s.model is None:
            s.model = self.model_name or await self._model_of(client, s)
        path, body = score_request(self.api, s.model, seqs)
        r = self._check(s, path, await client.post(s.url + path, json=body))
        return self._parsed(s, path, "scoring answer", lambda: parse_scores(self.api, _json(r), seqs))

    def _check(self, s: _Server, path: str, r: httpx.Response) -> httpx.Response:
        if r.status_code == 200:
            return r
        msg = f"{s.url}{path}: HTTP {r.status_code}: {_error_message(r)}"
        if r.status_code >= 500 or r.status_code in (408, 429):
            raise _Retry(msg)
        raise RemoteError(msg)

    async def _model_of(self, client: httpx.AsyncClient, s: _Server) -> str:
        r = self._check(s, "/v1/models", await client.get(s.url + "/v1/models", timeout=30))
        data = (_json(r) or {}).get("data") or []
        if not data:
            raise RemoteError(f"{s.url}/v1/models: the server lists no model")
        return data[0]["id"]

    # ------------------------------------------------------------------------------------------ control
    async def _post(self, client: httpx.AsyncClient, s: _Server, path: str,
                    body: dict | None = None) -> httpx.Response:
        r = await client.post(s.url + path, json=body if body is not None else {}, timeout=self.request_timeout)
        if r.status_code == 404:
            raise _NotFound(f"{s.url}{path}: not found (this server has no such endpoint; see "
                            "docs/remote_engines.md)")
        return self._check(s, path, r)

    async def _pause(self, client: httpx.AsyncClient, s: _Server) -> None:
        """Pause generation; with api=openai, a 404 on SGLang's /pause_generation means vLLM (its dev-mode /pause)."""
        if s.control != "vllm":
            try:
                await self._post(client, s, "/pause_generation", {"mode": self._mode})
                s.control = "sglang"
                return
            except _NotFound:
                if self.api != "openai" or s.control == "sglang":
                    raise
        try:
            await self._post(client, s, f"/pause?mode={VLLM_PAUSE[self._mode]}")
        except _NotFound:
            raise RemoteError(f"{s.url}: no weight-update endpoints (neither /pause_generation nor vLLM's /pause); "
                              "start vLLM with VLLM_SERVER_DEV_MODE=1 for weight updates") from None
        s.control = "vllm"

    async def _continue(self, client: httpx.AsyncClient, s: _Server) -> None:
        await self._post(client, s, "/resume" if s.control == "vllm" else "/continue_generation")

    async def _load(self, client: httpx.AsyncClient, s: _Server, path: str, version: int) -> None:
        """Load weights from disk on a paused server."""
        if s.control != "vllm":
            await self._post(client, s, "/update_weights_from_disk",
                             {"model_path": path, "weight_version": str(version)})
            return
        if not os.path.exists(path):  # vLLM's engine process dies on a path it cannot load: don't send one
            raise RemoteError(f"update_weights: {path}: no such file or directory here; vLLM's reload_weights "
                              "kills its engine on a missing path, so it is not sent (give a path that exists "
                              "both here and on the servers)")
        try:
            await self._post(client, s, "/collective_rpc", {"method": "reload_weights",
                                                            "kwargs": {"weights_path": path}})
        except _Retry as e:  # a 500 here is the worker's error (bad checkpoint), not an overload
            raise RemoteError(f"vLLM reload_weights failed: {e}") from None
        # the prefix cache holds KV computed with the old weights; for retract also drop the frozen requests' KV
        reset = "/reset_prefix_cache" + ("?reset_running_requests=true" if self._mode == "retract" else "")
        r = await self._post(client, s, reset)
        try:
            ok = (_json(r) or {}).get("success", True)
        except (ValueError, AttributeError):
            ok = True
        if not ok and self._mode != "in_place":  # in_place: the frozen requests hold their blocks
            log.warning("remote engine: %s: prefix cache not reset after the weight update", s.url)
        try:
            await self._post(client, s, "/update_weight_version", {"new_version": str(version)})
        except _NotFound:  # older vLLM: the version is only the client's
            pass

    async def _catch_up(self, client: httpx.AsyncClient, s: _Server) -> None:
        """Bring a server that missed weight updates to the current version (failing: treat it as down)."""
        try:
            loaded = False
            if s.control != "vllm":
                try:
                    await self._load(client, s, self._weights, self.version)
                    loaded = True
                except _NotFound:  # api=openai on vLLM: its reload needs a pause first
                    if self.api != "openai" or s.control == "sglang":
                        raise
            if not loaded:
                await self._pause(client, s)
                try:
                    await self._load(client, s, self._weights, self.version)
                finally:
                    await self._continue(client, s)
        except (RemoteError, _Retry) as e:
            raise ConnectionError(f"could not bring it to weight version {self.version}: {e}") from None
        s.version = self.version

    async def _control(self, fn) -> list:
        """fn(client, server) on every live server at once; failures mark servers dead; all failing raises."""
        async with self._client() as client:
            live = [s for s in self.servers if s.dead_until <= time.monotonic()] or list(self.servers)
            res = await asyncio.gather(*[fn(client, s) for s in live], return_exceptions=True)
            ok = [s for s, r in zip(live, res) if not isinstance(r, BaseException)]
            for s, r in zip(live, res):
                if isinstance(r, BaseException):
                    log.warning("remote engine: %s: %s", s.url, r)
                    if not isinstance(r, RemoteError):
                        s.dead_until = time.monotonic() + self.dead_cooldown
            if not ok:
                err = next(r for r in res if isinstance(r, BaseException))
                raise err if isinstance(err, RemoteError) else RemoteError(f"no server reachable: {err}")
            return ok

    def pause(self, mode: str | None = None) -> None:
        """Pause every live server (a server that does not answer is marked dead and caught up later)."""
        self._mode = self.resolve_pause_mode(mode or self.pause_mode)
        self._held = run_sync(lambda: self._control(self._pause))

    def resume(self) -> None:
        """Continue every server pause() paused (or every live one): a server whose load failed too."""
        now = time.monotonic()
        held, self._held = self._held or [s for s in self.servers if s.dead_until <= now], []
        self._mode = self.pause_mode

        async def go():
            async with self._client() as client:
                res = await asyncio.gather(*[self._continue(client, s) for s in held], return_exceptions=True)
            for s, r in zip(held, res):
                if isinstance(r, BaseException):  # its next request fails over, or catches it up
                    log.warning("remote engine: %s: continue_generation failed: %s", s.url, r)

        run_sync(go)

    def update_weights(self, src, version: int) -> None:
        """On paused servers (load_weights): src is a directory (or .safetensors file) the servers can read, a
        state dict, or a model with save_pretrained (both written to `weights_dir` first, which must be
        visible to the servers). A server that fails to load is brought up to date before its next request."""
        path = self._materialize(src)

        async def one(client, s):
            await self._load(client, s, path, version)
            s.version = version

        run_sync(lambda: self._control(one))
        self.version, self._weights = version, path  # before resume(): later tokens carry the new version

    def _auth(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _materialize(self, src) -> str:
        if isinstance(src, (str, os.PathLike)):
            return str(src)
        d = Path(self.weights_dir or tempfile.mkdtemp(prefix="thinkrl-weights-"))
        d.mkdir(parents=True, exist_ok=True)
        self.weights_dir = str(d)
        for old in [*d.glob("*.safetensors"), *d.glob("*.safetensors.index.json")]:  # no stale shards
            old.unlink()
        if hasattr(src, "save_pretrained"):
            src.save_pretrained(str(d))
        elif isinstance(src, Mapping):
            save_safetensors(src, d / "model.safetensors")
        else:
            raise ValueError(f"update_weights: src must be a path, a state dict or a model, got {type(src).__name__}")
        return str(d)

    def stats(self) -> dict:
        now = time.monotonic()
        return {**self.counters, "servers": [{"url": s.url, "load": s.load, "dead": s.dead_until > now,
                                              "version": s.version, **s.stats} for s in self.servers]}
