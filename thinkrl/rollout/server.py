"""`thinkrl serve`: an HTTP server over any InferenceEngine, speaking SGLang's native API and an OpenAI subset.

    server = Server(engine, tokenizer, model=model, model_dir="ckpt/")   # port=0: pick a free port
    port = server.start()            # background threads; returns the bound port
    ...                              # POST /generate, /v1/completions, /update_weights_from_disk, ...
    server.stop()

Two event loops: the HTTP loop (this module) and an engine loop in its own thread, so an engine that computes
inside its event loop (HFEngine) never blocks /health, /pause_generation or overload answers. Errors are JSON
`{"error": {"message", "type", "code"}}`; an engine exception is a 500 and the server stays up.
Native API: /generate (text or input_ids, single or batch, sampling_params, return_logprob), /update_weights_from_disk,
/pause_generation, /continue_generation, /flush_cache, /health, /get_model_info, /get_server_info, /get_weight_version.
OpenAI: /v1/models, /v1/completions, /v1/chat/completions (non-streaming; sampled-token log-probs only).
Each response's meta_info also carries `output_token_versions` (the policy version of every token), a thinkrl extension.
"""
from __future__ import annotations

import argparse
import asyncio
import hmac
import inspect
import logging
import signal
import threading
import time
import uuid
from pathlib import Path

from thinkrl.rollout.base import engine_class
from thinkrl.rollout.http_util import (IGNORED, NEUTRAL, HTTPError, Request, check_neutral, get_field, get_id_lists,
                                       get_str_list, json_bytes, read_request, write_response)
from thinkrl.rollout.openai_routes import OpenAIRoutes
from thinkrl.rollout.weights import load_safetensors
from thinkrl.types import Generation, SamplingParams

log = logging.getLogger(__name__)
IDLE_TIMEOUT = 300.0  # seconds a connection may sit idle (or send one request) before it is closed
OPEN_PATHS = {"/health", "/health_generate", "/ping"}  # answered without the API key (load-balancer probes)
# /pause_generation modes (SGLang's and vLLM's names) -> the engine's (thinkrl.rollout.base.PAUSE_MODES)
SERVER_PAUSE_MODES = {"abort": "abort", "retract": "retract", "in_place": "in_place", "keep": "in_place",
                      "wait": "in_place"}
class Server(OpenAIRoutes):
    def __init__(self, engine, tokenizer, *, model, model_dir: str = "", served_name: str | None = None,
                 host: str = "127.0.0.1", port: int = 30000, api_key: str | None = None, max_queue: int = 256,
                 max_body: int = 16 << 20, max_len: int | None = None):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.engine, self.tokenizer = engine, tokenizer
        self.model = model  # what the engine serves: context length, vocabulary, and the check of every load
        self.model_dir, self.host, self.port, self.api_key = str(model_dir), host, port, api_key or None
        self.served_name = served_name or (Path(self.model_dir).name if self.model_dir else "thinkrl")
        self.max_queue, self.max_body = max_queue, max_body
        cfg = getattr(self.model, "config", None)
        self.max_len = max_len or getattr(cfg, "max_position_embeddings", None) or tokenizer.model_max_length
        self.vocab = getattr(cfg, "vocab_size", None) or len(tokenizer)
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos_ids = sorted({*eos, *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])})
        self.queued = 0  # generate calls admitted and not yet answered (waiting or running in the engine)
        self.paused = False
        self._routes = {
            "/generate": self._generate, "/update_weights_from_disk": self._update_weights,
            "/pause_generation": self._pause, "/continue_generation": self._continue, "/flush_cache": self._flush,
            "/health": self._health, "/health_generate": self._health, "/ping": self._health,
            "/get_model_info": self._model_info, "/get_server_info": self._server_info,
            "/get_weight_version": lambda req: {"weight_version": str(self.engine.version)},
            "/v1/models": self._models, "/v1/completions": self._completions, "/v1/chat/completions": self._chat,
        }
        self._conns: set[asyncio.StreamWriter] = set()
        self._hloop = self._eloop = self._srv = None
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> int:
        """Serve from background threads; returns the bound port."""
        self._eloop = asyncio.new_event_loop()
        self._hloop = asyncio.new_event_loop()
        ready, err = threading.Event(), []

        def http():
            asyncio.set_event_loop(self._hloop)
            try:
                self._srv = self._hloop.run_until_complete(
                    asyncio.start_server(self._connection, self.host, self.port, limit=1 << 17))
                self.port = self._srv.sockets[0].getsockname()[1]
            except Exception as e:  # e.g. the port is taken
                err.append(e)
                return
            finally:
                ready.set()
            run(self._hloop)

        def run(loop):
            loop.run_forever()
            loop.close()

        for name, target in (("engine", lambda: run(self._eloop)), ("http", http)):
            t = threading.Thread(target=target, name=f"thinkrl-serve-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        ready.wait()
        if err:
            self.stop()
            raise err[0]
        return self.port

    def stop(self) -> None:
        """Close the listener and every open connection, then stop both loops."""
        async def cancel_all(http: bool):
            if http and self._srv is not None:
                self._srv.close()
                for w in list(self._conns):
                    w.transport.abort()
            me = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not me]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        for loop in (self._hloop, self._eloop):
            if loop is not None and loop.is_running():
                try:
                    asyncio.run_coroutine_threadsafe(cancel_all(loop is self._hloop), loop).result(timeout=5)
                except Exception:  # a loop busy in engine compute: it is a daemon thread
                    pass
                loop.call_soon_threadsafe(loop.stop)
        for t in self._threads:
            t.join(timeout=5)
        self._threads.clear()

    # ------------------------------------------------------------------------------------------ HTTP
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        try:
            while True:
                keep = True
                try:
                    req = await asyncio.wait_for(read_request(reader, writer, self.max_body), IDLE_TIMEOUT)
                    if req is None:
                        break
                    keep = req.keep_alive
                    status, payload = await self._dispatch(req)
                except HTTPError as e:  # malformed at the HTTP level: answer, then close
                    status, payload, keep = e.status, self._error(e), False
                if isinstance(payload, (dict, list)):
                    body, ctype = json_bytes(payload), "application/json"
                else:
                    body, ctype = str(payload).encode(), "text/plain; charset=utf-8"
                await write_response(writer, status, body, ctype, keep_alive=keep)
                if not keep:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            pass
        finally:
            self._conns.discard(writer)
            writer.close()

    @staticmethod
    def _error(e: HTTPError) -> dict:
        return {"error": {"message": e.message, "type": e.type, "code": e.status}}

    async def _dispatch(self, req: Request) -> tuple[int, object]:
        try:
            handler = self._routes.get(req.path.rstrip("/") or "/")
            if handler is None:
                raise HTTPError(404, f"no endpoint {req.path!r}", "not_found")
            if self.api_key and req.path not in OPEN_PATHS:
                auth = req.headers.get("authorization", "")
                if not hmac.compare_digest(auth.encode(), f"Bearer {self.api_key}".encode()):
                    raise HTTPError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                                    "authentication_error")
            if req.method not in ("GET", "POST", "PUT"):
                raise HTTPError(405, f"method {req.method} not allowed", "invalid_request_error")
            out = handler(req)
            out = await out if inspect.isawaitable(out) else out
            return out if isinstance(out, tuple) else (200, out)
        except HTTPError as e:
            return e.status, self._error(e)
        except Exception as e:  # a bug in a handler: answer 500, keep serving
            log.exception("thinkrl serve: %s %s failed", req.method, req.path)
            return 500, {"error": {"message": f"internal error: {type(e).__name__}: {e}", "type": "internal_error",
                                   "code": 500}}

    # ------------------------------------------------------------------------------------------ engine calls
    async def on_engine(self, fn, *args):
        """Run fn(*args) (sync) on the engine loop: serialised with an in-loop engine's generation."""
        async def call():
            return fn(*args)
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(call(), self._eloop))

    def sampling(self, prompts: list[list[int]], max_new: int | None, temperature: float, top_p: float, top_k: int,
                 stop: list[str], stop_ids: list[int], seed: int | None, field: str) -> SamplingParams:
        """Validated SamplingParams; max_new None means 'up to the context length'."""
        longest = max(len(p) for p in prompts)
        for p in prompts:
            bad = next((t for t in p if not 0 <= t < self.vocab), None)
            if bad is not None:
                raise HTTPError(400, f"token id {bad} out of range [0, {self.vocab})")
        if max_new is None:
            max_new = self.max_len - longest
        if max_new < 1 or longest + max_new > self.max_len:
            raise HTTPError(400, f"{field}={max_new}: prompt ({longest} tokens) + {max_new} new tokens exceeds the "
                                 f"model's context length ({self.max_len})")
        if top_p <= 0:
            raise HTTPError(400, "top_p: must be in (0, 1]")
        bad = next((t for t in stop_ids if not 0 <= t < self.vocab), None)
        if bad is not None:
            raise HTTPError(400, f"stop_token_ids: {bad} out of range [0, {self.vocab})")
        top_k = top_k if 0 < top_k < self.vocab else 0  # -1, 0 or >= vocab: off
        return SamplingParams(max_new_tokens=max_new, temperature=temperature, top_p=top_p, top_k=top_k,
                              stop_token_ids=sorted({*stop_ids, *self.eos_ids}), stop=stop, seed=seed)

    async def run(self, prompts: list[list[int]], params: SamplingParams, n: int) -> list[list[Generation]]:
        """n generations per prompt from the engine; overload is a 503, engine errors a 400 (ValueError) or 500."""
        if self.queued + len(prompts) > self.max_queue:
            raise HTTPError(503, f"server overloaded: {self.queued} requests in flight (max_queue={self.max_queue})",
                            "overloaded_error")
        self.queued += len(prompts)
        try:
            futs = [asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self.engine.generate(p, params, n),
                                                                         self._eloop)) for p in prompts]
            return list(await asyncio.gather(*futs))
        except ValueError as e:
            raise HTTPError(400, str(e)) from None
        except Exception as e:  # (cancellation is a BaseException: it passes through)
            log.exception("thinkrl serve: engine error")
            raise HTTPError(500, f"engine error: {type(e).__name__}: {e}", "internal_error") from None
        finally:
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

    # ------------------------------------------------------------------------------------------ native API
    async def _generate(self, req: Request):
        body = req.json()
        if not isinstance(body, dict):
            raise HTTPError(400, "request body: expected a JSON object")
        if get_field(body, "stream", "bool", False):
            raise HTTPError(400, "stream: streaming is not supported by thinkrl serve; send stream=false")
        check_neutral(body)
        has_text, has_ids = body.get("text") is not None, body.get("input_ids") is not None
        if has_text == has_ids:
            raise HTTPError(400, "give exactly one of text or input_ids")
        if has_text:
            text = body["text"]
            texts = [text] if isinstance(text, str) else text
            if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
                raise HTTPError(400, "text: expected a non-empty string or a list of them")
            prompts, batch = [list(self.tokenizer(t)["input_ids"]) for t in texts], not isinstance(text, str)
        else:
            prompts, batch = get_id_lists(body["input_ids"], "input_ids")
        sp = get_field(body, "sampling_params", "dict", {})
        unknown = sorted(set(sp) - set(NEUTRAL) - IGNORED - {"max_new_tokens", "temperature", "top_p", "top_k",
                                                             "stop", "stop_token_ids"})
        if unknown:
            raise HTTPError(400, f"sampling_params.{unknown[0]}: unknown or unsupported sampling parameter")
        check_neutral(sp, "sampling_params.")
        w = "sampling_params."
        n = get_field(sp, "n", "int", 1, lo=1, hi=1024, where=w)
        seed = sp.get("sampling_seed", sp.get("seed"))
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise HTTPError(400, "sampling_params.sampling_seed: expected int")
        stop_ids = get_field(sp, "stop_token_ids", "list", [], where=w)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids):
            raise HTTPError(400, "sampling_params.stop_token_ids: expected a list of ints")
        params = self.sampling(prompts, get_field(sp, "max_new_tokens", "int", 128, where=w),
                               get_field(sp, "temperature", "float", 1.0, lo=0, where=w),
                               get_field(sp, "top_p", "float", 1.0, hi=1, where=w),
                               get_field(sp, "top_k", "int", 0, lo=-1, where=w),
                               get_str_list(sp, "stop", w), stop_ids, seed, "sampling_params.max_new_tokens")
        want_lp = get_field(body, "return_logprob", "bool", False)
        with_text = get_field(body, "return_text_in_logprobs", "bool", False)
        rids = body.get("rid")
        rids = rids if isinstance(rids, list) else [rids] if rids else [uuid.uuid4().hex for _ in prompts]
        if len(rids) != len(prompts) or not all(isinstance(r, str) for r in rids):
            raise HTTPError(400, "rid: expected a string, or one string per prompt")
        t0 = time.perf_counter()
        results = await self.run(prompts, params, n)
        out = []
        for prompt, rid, gens in zip(prompts, rids, results):
            for j, g in enumerate(gens):
                out.append(self._native_item(g, params, prompt, rid if n == 1 else f"{rid}_{j}", want_lp, with_text,
                                             time.perf_counter() - t0, not sp.get("no_stop_trim", False)))
        return out if (batch or n > 1) else out[0]

    def _native_item(self, g: Generation, params, prompt, rid, want_lp, with_text, latency, trim) -> dict:
        text, matched = self.text_of(g, params, True, trim)
        finish = ({"type": "stop", "matched": matched} if g.finish == "stop" else
                  {"type": "length", "length": len(g.tokens)} if g.finish == "length" else
                  {"type": "abort", "message": "aborted (pause_generation mode=abort)"})
        meta = {"id": rid, "finish_reason": finish, "prompt_tokens": len(prompt), "completion_tokens": len(g.tokens),
                "cached_tokens": 0, "weight_version": str(self.engine.version),
                "output_token_versions": list(g.versions), "e2e_latency": latency}
        if want_lp:
            pieces = [self.tokenizer.decode([t]) if with_text else None for t in g.tokens]
            meta["output_token_logprobs"] = [[float(lp), int(t), s] for lp, t, s in zip(g.logprobs, g.tokens, pieces)]
        return {"text": text, "output_ids": list(g.tokens), "meta_info": meta}

    async def _update_weights(self, req: Request):
        body = req.json()
        if not isinstance(body, dict):
            raise HTTPError(400, "request body: expected a JSON object")
        path = get_field(body, "model_path", "str")
        fmt = body.get("load_format")
        if fmt not in (None, "auto", "safetensors"):
            raise HTTPError(400, f"load_format={fmt!r}: only safetensors directories are supported")
        version = body.get("weight_version")
        try:
            version = self.engine.version + 1 if version is None else int(version)
        except (TypeError, ValueError):
            raise HTTPError(400, f"weight_version={version!r}: thinkrl engines need an integer version") from None
        try:
            sd = await asyncio.to_thread(load_state_dict, path, self.model)
            if self.paused:  # by /pause_generation: continue_generation resumes
                await self.on_engine(self.engine.update_weights, sd, version)
            else:
                mode = self._engine_mode("abort" if get_field(body, "abort_all_requests", "bool", False) else "in_place")
                await self.on_engine(self.engine.load_weights, sd, version, mode)
        except (ValueError, OSError) as e:
            msg = f"update_weights_from_disk failed: {e}"
            return 400, {"success": False, "message": msg, "error": {"message": msg, "type": "invalid_request_error",
                                                                     "code": 400}}
        return {"success": True, "message": f"Loaded {len(sd)} tensors from {path}; weight version {version}.",
                "num_paused_requests": 0}

    def _engine_mode(self, mode: str) -> str:
        """The engine's pause mode for an SGLang or vLLM one: vLLM's keep and wait, and any mode the engine
        does not support (caps.pause_modes), become in_place (requests wait for continue_generation)."""
        mode = SERVER_PAUSE_MODES[mode]
        return mode if mode in self.engine.caps.pause_modes else "in_place"

    def _pause_engine(self, mode: str) -> str:
        mode = self._engine_mode(mode)
        self.engine.pause(mode)
        return mode

    async def _pause(self, req: Request):
        body = req.json() if req.method != "GET" else {}
        mode = (body or {}).get("mode", "abort")
        if mode not in SERVER_PAUSE_MODES:
            raise HTTPError(400, f"mode={mode!r}: expected {', '.join(SERVER_PAUSE_MODES)}")
        used = await self.on_engine(self._pause_engine, mode)
        self.paused = True
        return {"message": "Generation paused successfully.", "status": "ok", "mode": used}

    async def _continue(self, req: Request):
        await self.on_engine(self.engine.resume)
        self.paused = False
        return {"message": "Generation continued successfully.", "status": "ok"}

    async def _flush(self, req: Request):
        # answered for SGLang clients; thinkrl engines flush their prefix cache on every weight load themselves
        return "Cache flushed.\n"

    def _health(self, req: Request):
        return ""

    def _model_info(self, req: Request):
        return {"model_path": self.model_dir, "tokenizer_path": self.model_dir, "is_generation": True,
                "weight_version": str(self.engine.version), "served_model_name": self.served_name,
                "max_context_length": self.max_len}

    def _server_info(self, req: Request):
        return {"engine": self.engine.name, "weight_version": str(self.engine.version),
                "queued": self.queued, "max_queue": self.max_queue, "paused": self.paused,
                "max_context_length": self.max_len, "served_model_name": self.served_name}


def load_state_dict(path: str, model=None) -> dict:
    """Tensors from a safetensors file or every *.safetensors in a directory, checked against `model`'s
    parameter names and shapes (tied weights missing from the files are filled from their partner)."""
    if not Path(path).exists():
        raise ValueError(f"model_path={path!r}: no such file or directory")
    try:
        sd = load_safetensors(path)
    except ValueError:
        raise ValueError(f"model_path={path!r}: no *.safetensors files there") from None
    if model is None:
        return sd
    ref = model.state_dict()
    unknown = [k for k in sd if k not in ref]
    if unknown:
        raise ValueError(f"unknown tensor {unknown[0]!r} ({len(unknown)} unknown) in {path}")
    for k in [k for k in ref if k not in sd]:
        partner = next((q for q in sd if ref[q].data_ptr() == ref[k].data_ptr()), None)
        if partner is None:
            raise ValueError(f"tensor {k!r} missing from {path}")
        sd[k] = sd[partner]
    for k, t in sd.items():
        if tuple(t.shape) != tuple(ref[k].shape):
            raise ValueError(f"tensor {k!r} has shape {tuple(t.shape)}, the model has {tuple(ref[k].shape)}")
        sd[k] = t.to(device=ref[k].device, dtype=ref[k].dtype)
    return sd


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
                        max_queue=a.max_queue)
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
