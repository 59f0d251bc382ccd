"""`thinkrl serve`: an HTTP server over any InferenceEngine, speaking SGLang's native API and an OpenAI subset.

    server = Server(engine, tokenizer, model=model, model_dir="ckpt/")   # port=0: pick a free port
    port = server.start()            # background threads; returns the bound port
    ...                              # POST /generate, /v1/completions, /update_weights_from_disk, ...
    server.stop()

A FastAPI app served by uvicorn (the stack SGLang and vLLM serve with) on its own thread and event loop, and the
engine on a second loop in its own thread, so an engine that computes inside its event loop (HFEngine) never
blocks /health, /pause_generation or overload answers. Binds 127.0.0.1 unless told otherwise.
Errors are JSON `{"error": {"message", "type", "code"}}`: bad input is a 4xx naming the field (malformed or too
deeply nested JSON 400, body over `max_body` 413, more than `max_queue` requests queued 503 with Retry-After), an
engine exception a 500, and the server stays up. With `api_key` every route but /health* (SGLang exempts those
too, for load-balancer probes) answers 401 without `Authorization: Bearer KEY`. GET /openapi.json lists the routes.
Native API: /generate (text or input_ids, single or batch, sampling_params, return_logprob, top_logprobs_num,
logprob_start_len: the prompt's log-probs, max_new_tokens 0: scoring only, stream), /update_weights_from_disk, /pause_generation, /continue_generation, /flush_cache, /health,
/health_generate, /get_model_info, /get_server_info, /get_weight_version.
(native_routes.py). OpenAI: /v1/models, /v1/completions, /v1/chat/completions (openai_routes.py: streaming,
top-N log-probs, vLLM's prompt_logprobs and echo for the prompt's log-probs).
Each response's meta_info also carries `output_token_versions` (the policy version of every token), a thinkrl extension.
"""
from __future__ import annotations

import argparse
import asyncio
import hmac
import inspect
import logging
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from thinkrl.rollout.api_fields import INT64, APIError, parse_json
from thinkrl.rollout.base import engine_class
from thinkrl.rollout.native_routes import NativeRoutes
from thinkrl.rollout.openai_routes import OpenAIRoutes
from thinkrl.types import Generation, SamplingParams

log = logging.getLogger(__name__)
KEEP_ALIVE = 60.0  # seconds an idle keep-alive connection stays open
GET_POST = ["GET", "POST"]
# path -> (methods, handler name); every route of the server (the API key middleware covers them all)
ROUTES = {
    "/generate": (["POST"], "_generate"), "/update_weights_from_disk": (["POST"], "_update_weights"),
    "/pause_generation": (GET_POST, "_pause"), "/continue_generation": (GET_POST, "_continue"),
    "/flush_cache": (GET_POST, "_flush"), "/health": (GET_POST, "_health"),
    "/health_generate": (GET_POST, "_health"), "/ping": (GET_POST, "_health"),
    "/get_model_info": (GET_POST, "_model_info"), "/get_server_info": (GET_POST, "_server_info"),
    "/get_weight_version": (GET_POST, "_weight_version"), "/v1/models": (["GET"], "_models"),
    "/v1/completions": (["POST"], "_completions"), "/v1/chat/completions": (["POST"], "_chat"),
}
ANY_JSON = {"requestBody": {"content": {"application/json": {"schema": {"type": "object"}}}}}


@dataclass
class Call:
    """One request as the handlers see it: method, the body already read (bounded) and the query."""

    method: str
    body: bytes = b""
    query: dict = field(default_factory=dict)

    def json(self):
        return parse_json(self.body)


class _Guard:
    """ASGI middleware: the API key on every route but /health*, before any body is read."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        key = self.server.api_key
        if key and scope["type"] == "http" and not scope["path"].startswith("/health"):
            auth = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(auth, f"Bearer {key}".encode()):
                err = APIError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                               "authentication_error")
                await JSONResponse(err.payload(), 401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.payload(), e.status, headers=e.headers)


class Server(NativeRoutes, OpenAIRoutes):
    def __init__(self, engine, tokenizer, *, model, model_dir: str = "", served_name: str | None = None,
                 host: str = "127.0.0.1", port: int = 30000, api_key: str | None = None, max_queue: int = 256,
                 max_body: int = 16 << 20, max_len: int | None = None, retry_after: int = 1):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.engine, self.tokenizer = engine, tokenizer
        self.model = model  # what the engine serves: context length, vocabulary, and the check of every load
        self.model_dir, self.host, self.port, self.api_key = str(model_dir), host, port, api_key or None
        self.served_name = served_name or (Path(self.model_dir).name if self.model_dir else "thinkrl")
        self.max_queue, self.max_body, self.retry_after = max_queue, max_body, retry_after
        cfg = getattr(self.model, "config", None)
        self.max_len = max_len or getattr(cfg, "max_position_embeddings", None) or tokenizer.model_max_length
        self.vocab = getattr(cfg, "vocab_size", None) or len(tokenizer)
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos_ids = sorted({*eos, *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])})
        self.queued = 0  # generate calls admitted and not yet answered (waiting or running in the engine)
        self.paused = False
        self.counters = {"requests": 0, "rejected_503": 0}
        self.app = self._build_app()
        self._eloop = self._hloop = self._uv = None
        self._threads: list[threading.Thread] = []

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="thinkrl serve", docs_url=None, redoc_url=None)
        for path, (methods, name) in ROUTES.items():
            endpoint = self._endpoint(getattr(self, name))
            for m in methods:  # one operation per method, each with its own id in /openapi.json
                app.add_api_route(path, endpoint, methods=[m], name=name.strip("_"),
                                  operation_id=f"{m.lower()}{path.replace('/', '_')}",
                                  openapi_extra=ANY_JSON if m == "POST" else None)

        async def http_error(request, e: StarletteHTTPException):  # 404, 405 from routing
            kind = "not_found" if e.status_code == 404 else "invalid_request_error"
            msg = (f"no endpoint {request.url.path!r}" if e.status_code == 404 else
                   f"method {request.method} not allowed on {request.url.path}" if e.status_code == 405 else
                   str(e.detail))
            return _error_response(APIError(e.status_code, msg, kind, dict(e.headers or {})))

        app.add_exception_handler(StarletteHTTPException, http_error)
        app.add_middleware(_Guard, server=self)
        return app

    def _endpoint(self, fn):
        async def endpoint(request: Request) -> Response:
            try:
                call = Call(request.method, await self._read(request), dict(request.query_params))
                out = fn(call)
                out = await out if inspect.isawaitable(out) else out
            except APIError as e:
                return _error_response(e)
            except Exception as e:  # a bug in a handler: answer 500, keep serving
                log.exception("thinkrl serve: %s %s failed", request.method, request.url.path)
                return _error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", "internal_error"))
            if isinstance(out, Response):
                return out
            status, payload = out if isinstance(out, tuple) else (200, out)
            if isinstance(payload, (dict, list)):
                return JSONResponse(payload, status)
            return PlainTextResponse(str(payload), status)
        endpoint.__name__ = fn.__name__.strip("_")
        return endpoint

    async def _read(self, request: Request) -> bytes:
        """The request body, at most max_body bytes (a longer one is a 413 before it is all read)."""
        n = request.headers.get("content-length")
        if n is not None and n.isdigit() and int(n) > self.max_body:
            raise APIError(413, f"request body of {n} bytes exceeds the limit of {self.max_body} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():  # (chunked bodies too)
            size += len(chunk)
            if size > self.max_body:
                raise APIError(413, f"request body exceeds the limit of {self.max_body} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> int:
        """Serve from background threads; returns the bound port (an OSError if it cannot bind)."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off",
                                timeout_keep_alive=int(KEEP_ALIVE), timeout_graceful_shutdown=2, backlog=2048)
        self._uv = uvicorn.Server(config)
        self._eloop, self._hloop = asyncio.new_event_loop(), asyncio.new_event_loop()
        err: list[BaseException] = []

        def http():
            asyncio.set_event_loop(self._hloop)
            try:
                self._hloop.run_until_complete(self._uv.serve(sockets=[sock]))
            except BaseException as e:  # (uvicorn exits with SystemExit on a failed startup)
                err.append(e)
            finally:
                sock.close()
                self._hloop.close()

        def engine():
            self._eloop.run_forever()
            self._eloop.close()

        for name, target in (("engine", engine), ("http", http)):
            t = threading.Thread(target=target, name=f"thinkrl-serve-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        while not self._uv.started and self._threads[1].is_alive():
            time.sleep(0.01)
        if not self._uv.started:
            self.stop()
            raise OSError(f"thinkrl serve: could not start on {self.host}:{self.port}: {err[0] if err else '?'}")
        return self.port

    def stop(self) -> None:
        """Close the listener and every open connection (requests in flight get no answer), then stop both loops."""
        uv, hloop = self._uv, self._hloop
        if uv is not None and hloop is not None and not hloop.is_closed():
            def abort():
                uv.should_exit = uv.force_exit = True
                for conn in list(uv.server_state.connections):
                    if conn.transport is not None:
                        conn.transport.abort()
            try:
                hloop.call_soon_threadsafe(abort)
            except RuntimeError:  # its loop just closed
                pass
        if self._eloop is not None and not self._eloop.is_closed():
            async def cancel_all():
                me = asyncio.current_task()
                tasks = [t for t in asyncio.all_tasks() if t is not me]
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            if len(self._threads) > 1:
                self._threads[1].join(timeout=10)  # the HTTP side first: nothing new reaches the engine
            try:
                asyncio.run_coroutine_threadsafe(cancel_all(), self._eloop).result(timeout=5)
            except Exception:  # a loop busy in engine compute: it is a daemon thread
                pass
            try:
                self._eloop.call_soon_threadsafe(self._eloop.stop)
            except RuntimeError:
                pass
        for t in self._threads:
            t.join(timeout=5)
        self._threads.clear()

    # ------------------------------------------------------------------------------------------ engine calls
    async def on_engine(self, fn, *args):
        """Run fn(*args) (sync) on the engine loop: serialised with an in-loop engine's generation."""
        async def call():
            return fn(*args)
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(call(), self._eloop))

    def sampling(self, prompts: list[list[int]], max_new: int | None, temperature: float, top_p: float, top_k: int,
                 stop: list[str], stop_ids: list[int], seed: int | None, field: str,
                 top_logprobs: int = 0, score_only: bool = False) -> SamplingParams:
        """Validated SamplingParams; max_new None means 'up to the context length'; 0 is allowed with
        `score_only` (a request that scores its prompt and generates nothing)."""
        longest = max(len(p) for p in prompts)
        for p in prompts:
            bad = next((t for t in p if not 0 <= t < self.vocab), None)
            if bad is not None:
                raise APIError(400, f"token id {bad} out of range [0, {self.vocab})")
        if max_new is None:
            max_new = self.max_len - longest
        if max_new < (0 if score_only else 1) or longest + max_new > self.max_len:
            raise APIError(400, f"{field}={max_new}: prompt ({longest} tokens) + {max_new} new tokens exceeds the "
                                f"model's context length ({self.max_len})")
        if top_p <= 0:
            raise APIError(400, "top_p: must be in (0, 1]")
        bad = next((t for t in stop_ids if not 0 <= t < self.vocab), None)
        if bad is not None:
            raise APIError(400, f"stop_token_ids: {bad} out of range [0, {self.vocab})")
        if seed is not None and not INT64[0] <= seed <= INT64[1]:
            raise APIError(400, f"seed: {seed} is out of the 64-bit range")
        top_k = top_k if 0 < top_k < self.vocab else 0  # -1, 0 or >= vocab: off
        return SamplingParams(max_new_tokens=max_new, temperature=temperature, top_p=top_p, top_k=top_k,
                              stop_token_ids=sorted({*stop_ids, *self.eos_ids}), stop=stop, seed=seed,
                              top_logprobs=top_logprobs)

    async def run(self, prompts: list[list[int]], params: SamplingParams, n: int) -> list[list[Generation]]:
        """n generations per prompt from the engine (max_new_tokens 0: n empty ones); beyond max_queue a 503
        (with Retry-After), engine errors a 400 (ValueError) or 500."""
        if params.max_new_tokens == 0:
            return [[Generation([], [], [], "length") for _ in range(n)] for _ in prompts]
        self._admit(len(prompts))
        try:
            futs = [asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self.engine.generate(p, params, n),
                                                                         self._eloop)) for p in prompts]
            return list(await asyncio.gather(*futs))
        except ValueError as e:
            raise APIError(400, str(e)) from None
        except Exception as e:  # (cancellation is a BaseException: it passes through)
            log.exception("thinkrl serve: engine error")
            raise APIError(500, f"engine error: {type(e).__name__}: {e}", "internal_error") from None
        finally:
            self.queued -= len(prompts)

    async def score(self, prompts: list[list[int]]) -> list[list[float]]:
        """Teacher-forced log-probs of the prompts (engine.score: [0.0, log p(p[1] | p[:1]), ...]), on the engine
        loop (serialised with an in-loop engine's generation); admission and errors as run(); a 400 when the
        engine cannot score (caps.score)."""
        if not self.engine.caps.score:
            raise APIError(400, f"prompt log-probs: the {self.engine.name} engine cannot score prompts")
        self._admit(len(prompts))
        try:
            return await self.on_engine(self.engine.score, prompts)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        except Exception as e:
            log.exception("thinkrl serve: engine error")
            raise APIError(500, f"engine error: {type(e).__name__}: {e}", "internal_error") from None
        finally:
            self.queued -= len(prompts)

    def _admit(self, k: int) -> None:
        """k more prompts in flight, or a 503 with Retry-After beyond max_queue."""
        self.counters["requests"] += 1
        if self.queued + k > self.max_queue:
            self.counters["rejected_503"] += 1
            raise APIError(503, f"server overloaded: {self.queued} requests in flight (max_queue={self.max_queue})",
                           "overloaded_error", {"Retry-After": str(self.retry_after)})
        self.queued += k

    async def stream(self, prompts: list[list[int]], params: SamplingParams, n: int):
        """(prompt index, StreamEvent) as the engine samples (engine.generate_stream, run on the engine loop);
        admission and errors as run(). Closing it early cancels the engine's requests."""
        self._admit(len(prompts))
        hloop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def put(item):
            try:
                hloop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the HTTP loop is gone
                pass

        async def pump(i: int, prompt: list[int]):
            try:
                async for ev in self.engine.generate_stream(prompt, params, n):
                    put((i, ev))
                put((i, None))
            except BaseException as e:
                put((i, e))
                raise

        futs = [asyncio.run_coroutine_threadsafe(pump(i, p), self._eloop) for i, p in enumerate(prompts)]
        try:
            left = len(prompts)
            while left:
                i, ev = await queue.get()
                if ev is None:
                    left -= 1
                elif isinstance(ev, ValueError):
                    raise APIError(400, str(ev))
                elif isinstance(ev, BaseException):
                    log.error("thinkrl serve: engine error: %s: %s", type(ev).__name__, ev)
                    raise APIError(500, f"engine error: {type(ev).__name__}: {ev}", "internal_error")
                else:
                    yield i, ev
        finally:
            for f in futs:
                f.cancel()
            self.queued -= len(prompts)

    def text_of(self, g: Generation, params: SamplingParams, skip_special: bool = True, trim: bool = True):
        """(text, matched): decoded text (cut before a matched stop string when trim) and what stopped it."""
        text = self.tokenizer.decode(g.tokens, skip_special_tokens=skip_special)
        if g.finish != "stop":
            return text, None
        if g.tokens and g.tokens[-1] in params.stop_token_ids:
            return text, g.tokens[-1]
        hits = [(text.find(s), s) for s in params.stop if s and s in text]
        if not hits:
            return text, None
        at, s = min(hits)
        return (text[:at] if trim else text), s

def make_engine(model, tokenizer, kind: str = "auto"):
    """kind: embedded (auto) or hf, from the engine registry."""
    return engine_class("embedded" if kind == "auto" else kind)(model, tokenizer)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="thinkrl serve", description="HTTP inference server: SGLang-compatible "
                                "native API (/generate, /update_weights_from_disk, ...) and an OpenAI subset (/v1)")
    p.add_argument("--model", required=True, help="checkpoint directory (Hugging Face format, safetensors)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY")
    p.add_argument("--max-queue", type=int, default=256, help="requests in flight before answering 503")
    p.add_argument("--max-body-mb", type=float, default=16.0, help="request body limit (larger: 413)")
    p.add_argument("--engine", choices=["auto", "embedded", "hf"], default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--served-model-name", default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from thinkrl.device import resolve_device
    from thinkrl.models.loading import ModelLoadError, load_checkpoint

    try:
        model, tok = load_checkpoint(a.model, device=resolve_device(a.device), dtype=a.dtype)
        server = Server(make_engine(model.eval(), tok, a.engine), tok, model=model, model_dir=a.model,
                        served_name=a.served_model_name, host=a.host, port=a.port, api_key=a.api_key,
                        max_queue=a.max_queue, max_body=int(a.max_body_mb * (1 << 20)))
        port = server.start()
    except (ModelLoadError, ValueError, OSError) as e:
        print(f"thinkrl serve: {e}")
        return 2
    print(f"thinkrl serve: {server.served_name} on http://{a.host}:{port} (engine {server.engine.name})",
          flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    while not done.wait(1.0):
        pass
    server.stop()
    server.engine.close()
    return 0
