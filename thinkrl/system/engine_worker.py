"""ProcessEngine: the embedded engine in a process of its own, behind the InferenceEngine protocol.

    engine = ProcessEngine(model, tokenizer, threads=1)            # starts the engine process
    gens = await engine.generate(prompt_ids, params, n=8)          # many in flight (asyncio), like EmbeddedEngine
    engine.update_weights(state_dict, version=3)                   # pause -> load -> resume, in the engine process
    engine.close()

Why: on one machine the trainer and the engine then run at the same time on separate cores (each with its own
torch threads and its own GIL); in one process they would take turns. The engine process keeps its own copy of
the weights. Weight transports (thinkrl.system.weights): "pipe" (the state dict pickled over the control pipe),
"shm" (a shared-memory copy mapped by both processes), "disk" (safetensors), "dist" (torch.distributed
broadcast). Every load pauses the engine at a token boundary, copies the weights in and resumes: in-flight
sequences continue with the new weights (partial rollout) and their later tokens carry the new version.

Protocol on the pipe: parent -> child ("gen", rid, prompt, params, n) | ("ctl", rid, op, args);
child -> parent ("res", rid, ok, payload). Generations run on an asyncio loop in the child; control operations
run in the child's reader thread, in the order they were sent. Engine processes fork from a forkserver that
imports the main module once (as `spawn` would): a script that starts one needs `if __name__ == "__main__":`.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import pickle
import threading
import time
from typing import Any

import torch
import torch.multiprocessing as tmp

from thinkrl.types import Generation, SamplingParams

log = logging.getLogger(__name__)
TRANSPORTS = ("pipe", "shm", "disk", "dist")


class EngineProcessError(RuntimeError):
    """The engine process failed or died."""


def _err(e: BaseException) -> tuple[str, str]:
    return ("ValueError" if isinstance(e, ValueError) else "EngineProcessError", f"{type(e).__name__}: {e}")


def _exception(kind: str, msg: str) -> Exception:
    """Bad input stays a ValueError (with the engine's message); anything else is an EngineProcessError."""
    return ValueError(msg.removeprefix("ValueError: ")) if kind == "ValueError" else EngineProcessError(
        f"engine process: {msg}")


# ============================================================================ child side
def _child_main(conn, model_bytes: bytes, tok_bytes: bytes | None, version: int, threads: int, engine_kwargs: dict):
    torch.set_num_threads(max(1, threads))
    from thinkrl.rollout.engine import EmbeddedEngine
    from thinkrl.system import weights as W

    send_lock = threading.Lock()

    def send(msg) -> None:
        with send_lock:
            conn.send(msg)

    try:
        model = pickle.loads(model_bytes).eval()
        tok = pickle.loads(tok_bytes) if tok_bytes is not None else None
        engine = EmbeddedEngine(model, tokenizer=tok, version=version, **engine_kwargs)
    except Exception as e:  # report, then exit
        send(("res", 0, False, ("EngineProcessError", f"failed to start: {type(e).__name__}: {e}")))
        return
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="thinkrl-engine-loop", daemon=True).start()
    tasks: dict[int, concurrent.futures.Future] = {}
    state: dict[str, Any] = {"shm": None, "pg": None}

    async def gen(rid, prompt, params, n):
        try:
            out = await engine.generate(prompt, params, n)
            send(("res", rid, True, out))
        except asyncio.CancelledError:
            send(("res", rid, False, ("EngineProcessError", "cancelled")))
        except Exception as e:
            send(("res", rid, False, _err(e)))
        finally:
            tasks.pop(rid, None)

    def load(sd, v: int) -> None:
        engine.pause()
        try:
            engine.update_weights(sd, v)
        finally:
            engine.resume()

    def ctl(op: str, args: tuple):
        if op == "update":  # transport "pipe": the state dict came with the message
            return load(args[0], args[1])
        if op == "attach_shm":
            state["shm"] = args[0]
            return None
        if op == "load_shm":
            return load(state["shm"], args[0])
        if op == "load_disk":
            return load(W.load_safetensors(args[0]), args[1])
        if op == "join_pg":
            state["pg"] = W.BroadcastReceiver(*args)
            return None
        if op == "load_pg":
            return load(state["pg"].receive(), args[0])
        if op == "pause":
            return engine.pause(*args)
        if op == "resume":
            return engine.resume()
        if op == "abort_all":
            return engine.abort_all()
        if op == "stats":
            return {**engine.stats(), "version": engine.version, "threads": torch.get_num_threads(),
                    "cpu_seconds": time.process_time()}
        if op == "progress":  # most tokens generated by a running sequence (tests use it to time an update)
            # read without the step lock: the engine loop re-takes it right after every step, so a waiter
            # could starve until the whole generation is over (measured: 5 of 12 polls saw only the end)
            return int(engine.st.gen.max()) if engine._running else 0
        raise ValueError(f"unknown control operation {op!r}")

    send(("res", 0, True, {"version": engine.version, "threads": torch.get_num_threads()}))
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break
            if msg[0] == "gen":
                _, rid, prompt, params, n = msg
                tasks[rid] = asyncio.run_coroutine_threadsafe(gen(rid, prompt, params, n), loop)
            elif msg[0] == "cancel":
                fut = tasks.get(msg[1])
                if fut is not None:
                    fut.cancel()
            elif msg[0] == "close":
                break
            else:
                _, rid, op, args = msg
                try:
                    send(("res", rid, True, ctl(op, args)))
                except Exception as e:
                    send(("res", rid, False, _err(e)))
    finally:
        engine.close()
        loop.call_soon_threadsafe(loop.stop)
        if state["pg"] is not None:
            state["pg"].close()


# ============================================================================ parent side
class ProcessEngine:
    """The InferenceEngine protocol over an EmbeddedEngine running in a process of its own (see `_context`)."""

    def __init__(self, model, tokenizer=None, *, version: int = 0, threads: int = 1, transport: str = "shm",
                 weights_dir: str | None = None, start_timeout: float = 300.0, **engine_kwargs):
        if transport not in TRANSPORTS:
            raise ValueError(f"ProcessEngine: transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        if threads < 1:
            raise ValueError(f"ProcessEngine: threads must be >= 1, got {threads}")
        self.version, self.transport, self.tokenizer = version, transport, tokenizer
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple] = {}  # rid -> (loop or None, future)
        self._lock = threading.Lock()  # the pending table
        self._send_lock = threading.Lock()  # the pipe (a big message must not block the reader)
        self._closed = False
        self._shm = self._disk = self._bcast = None
        self._weights_dir = weights_dir
        ctx = _context()
        self._conn, child_conn = ctx.Pipe()
        tok_bytes = pickle.dumps(tokenizer) if tokenizer is not None else None
        self._proc = ctx.Process(target=_child_main, name="thinkrl-engine",
                                 args=(child_conn, pickle.dumps(model), tok_bytes, version, threads, engine_kwargs),
                                 daemon=True)
        self._proc.start()
        child_conn.close()
        ready: concurrent.futures.Future = concurrent.futures.Future()
        self._pending[0] = (None, ready)
        self._reader = threading.Thread(target=self._read, name="thinkrl-engine-reader", daemon=True)
        self._reader.start()
        try:
            self.info = ready.result(timeout=start_timeout)
        except concurrent.futures.TimeoutError:
            self.close()
            raise EngineProcessError(f"the engine process did not start within {start_timeout:.0f} s") from None
        except EngineProcessError:
            self.close()
            raise

    # ------------------------------------------------------------------ plumbing
    def _read(self) -> None:
        while True:
            try:
                _, rid, ok, payload = self._conn.recv()
            except (EOFError, OSError):
                break
            with self._lock:
                loop, fut = self._pending.pop(rid, (None, None))
            if fut is not None:
                _settle(loop, fut, payload if ok else _exception(*payload))
        with self._lock:  # the process is gone: fail whatever still waits
            pending, self._pending = self._pending, {}
        for loop, fut in pending.values():
            _settle(loop, fut, EngineProcessError("the engine process exited"))

    def _send(self, msg) -> None:
        with self._send_lock:
            if self._closed or not self._proc.is_alive():
                raise EngineProcessError("the engine process is not running")
            self._conn.send(msg)

    def control(self, op: str, *args) -> concurrent.futures.Future:
        """Send a control operation; the future holds its result once the engine process has done it."""
        rid = next(self._ids)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._pending[rid] = (None, fut)
        try:
            self._send(("ctl", rid, op, args))
        except BaseException:
            with self._lock:
                self._pending.pop(rid, None)
            raise
        return fut

    def call(self, op: str, *args, timeout: float | None = None):
        return self.control(op, *args).result(timeout=timeout)

    # ------------------------------------------------------------------ InferenceEngine protocol
    async def generate(self, input_ids: list[int], params: SamplingParams | None = None, n: int = 1) -> list[Generation]:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        rid = next(self._ids)
        with self._lock:
            self._pending[rid] = (loop, fut)
        self._send(("gen", rid, list(input_ids), params or SamplingParams(), n))
        try:
            return await fut
        except asyncio.CancelledError:
            with self._lock:
                self._pending.pop(rid, None)
            try:
                self._send(("cancel", rid))
            except (EngineProcessError, OSError):
                pass
            raise

    def generate_batch(self, prompts: list[list[int]], params: SamplingParams | None = None,
                       n: int = 1) -> list[list[Generation]]:
        futs = []
        for p in prompts:
            rid, fut = next(self._ids), concurrent.futures.Future()
            with self._lock:
                self._pending[rid] = (None, fut)
            self._send(("gen", rid, list(p), params or SamplingParams(), n))
            futs.append(fut)
        return [f.result() for f in futs]

    def pause(self, mode: str = "wait") -> None:
        self.call("pause", mode)

    def resume(self) -> None:
        self.call("resume")

    def abort_all(self) -> None:
        self.call("abort_all")

    def update_weights(self, src, version: int) -> None:
        """Load a state dict (or an nn.Module's) with this engine's transport, or a safetensors path from disk."""
        from thinkrl.system import weights as W

        if isinstance(src, (str, bytes)) or hasattr(src, "__fspath__"):
            return self.load_from_disk(src, version)
        sd = src.state_dict() if isinstance(src, torch.nn.Module) else src
        if self.transport == "pipe":
            self.call("update", W.cpu_state_dict(sd), version)
        elif self.transport == "shm":
            if self._shm is None:
                self._shm = W.SharedWeights(sd)
                self.call("attach_shm", self._shm.tensors)
            self._shm.write(sd)
            self.call("load_shm", version)
        elif self.transport == "disk":
            if self._disk is None:
                self._disk = W.DiskStore(self._weights_dir)
            self.load_from_disk(self._disk.save(sd, version), version)
        else:  # dist: a broadcast group of two (this process is rank 0)
            if self._bcast is None:
                self._bcast = W.BroadcastSender([self], sd)
            self._bcast.push(sd, version)
        self.version = version

    def load_from_disk(self, path, version: int) -> None:
        self.call("load_disk", str(path), version)
        self.version = version

    def stats(self) -> dict:
        return self.call("stats", timeout=60)

    def close(self) -> None:
        with self._send_lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._conn.send(("close",))
            except (OSError, BrokenPipeError):
                pass
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(timeout=5)
        self._conn.close()
        for res in (self._bcast, self._shm, self._disk):
            if res is not None:
                res.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):  # best effort: never leave an engine process behind
        try:
            if not self._closed:
                self.close()
        except Exception:
            pass


_PRELOAD = ["__main__", "thinkrl.system.engine_worker", "thinkrl.rollout.engine",
            "transformers.models.llama.modeling_llama", "transformers.models.qwen2.modeling_qwen2"]


def _context():
    """forkserver (Linux, macOS): the server imports torch, transformers and the engine once; every engine process
    is then forked from it (a fresh, single-threaded process) in well under a second. spawn elsewhere."""
    import multiprocessing.forkserver as fs

    try:
        ctx = tmp.get_context("forkserver")
    except ValueError:
        return tmp.get_context("spawn")
    if getattr(fs._forkserver, "_forkserver_pid", None) is None:
        ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _settle(loop, fut, res) -> None:
    if loop is None:
        if not fut.done():
            fut.set_exception(res) if isinstance(res, BaseException) else fut.set_result(res)
        return

    def go():
        if not fut.done():
            fut.set_exception(res) if isinstance(res, BaseException) else fut.set_result(res)

    try:
        loop.call_soon_threadsafe(go)
    except RuntimeError:  # the event loop is closed
        pass


def wait_all(futs, timeout: float | None = None) -> list:
    """Results of concurrent futures (raises the first error)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    return [f.result(timeout=None if deadline is None else max(0.0, deadline - time.monotonic())) for f in futs]
