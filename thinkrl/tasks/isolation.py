"""Run reward functions so that a bad one can never stop training.

A reward that raises, returns something that is not a finite number, or runs past its timeout
scores 0 and is counted (``reward/errors``, ``reward/timeouts``); training goes on.

    with RewardPool(num_workers=2, timeout=10.0) as pool:
        rewards, metrics = pool.score(task, [(response, sample), ...])
        rewards, metrics = await pool.ascore(task, items)      # from asyncio code

Modes:

* ``"process"`` (default): persistent worker processes (``spawn`` or ``forkserver`` context).
  A worker that runs past ``timeout + grace`` is killed (SIGKILL) and replaced, so even a hang in
  C code (a huge integer power, a regex) is contained; a crashed worker is replaced too. The task is
  pickled once per worker (a task that cannot be pickled is a clear error: use mode "thread").
* ``"thread"``: a thread pool; a timeout interrupts pure-Python code with an asynchronous exception
  (`call_with_timeout`). Code stuck inside one C call cannot be interrupted: the call is abandoned
  (scored 0, counted) and its thread stays busy until the call returns.
* ``"inline"``: the calling thread, with `call_with_timeout`; cheapest, same limits as "thread".

`call_with_timeout(fn, timeout, *args)` works in any thread (unlike ``signal.alarm``).

Training, evaluation and filtering score every response through one `Scorer` (built by `make_scorer` from
``task.reward_isolation`` and ``task.reward_timeout``), which the task's Workflow awaits: the engine's event loop
keeps stepping while rewards are computed elsewhere. ``auto`` isolation is the task's own declaration
(`Task.reward_isolation`): ``process`` for user rewards, ``inline`` only for built-ins whose reward cannot hang.
"""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import ctypes
import hashlib
import logging
import math
import multiprocessing as mp
import pickle
import queue
import threading
import time
from multiprocessing.connection import wait as mp_wait

log = logging.getLogger("thinkrl")

# ----------------------------------------------------------------------------- timeouts in threads


class RewardTimeout(Exception):
    """Raised inside a call that ran past its timeout."""


class _Interrupt(BaseException):
    """Injected asynchronously; a BaseException so that ``except Exception`` in user code cannot swallow it."""


def call_with_timeout(fn, timeout: float | None, *args, **kwargs):
    """Call ``fn(*args, **kwargs)`` in this thread; raise RewardTimeout after `timeout` seconds.

    A watchdog thread injects an exception into this thread (``PyThreadState_SetAsyncExc``); it is
    raised at the next Python bytecode, so pure-Python loops stop promptly, while one long C call
    (e.g. ``9**(9**9)``) finishes before the exception lands. ``timeout`` None or <= 0: no limit.
    """
    if timeout is None or timeout <= 0:
        return fn(*args, **kwargs)
    tid = threading.get_ident()
    lock = threading.Lock()
    state = {"done": False, "fired": False}

    def fire() -> None:
        with lock:
            if not state["done"]:
                state["fired"] = True
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), ctypes.py_object(_Interrupt))

    timer = threading.Timer(timeout, fire)
    timer.daemon = True
    try:
        timer.start()
        try:
            return fn(*args, **kwargs)
        finally:
            with lock:
                state["done"] = True
            timer.cancel()
            if state["fired"]:  # set but maybe not delivered yet: clear it
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), None)
    except _Interrupt:
        raise RewardTimeout(f"timed out after {timeout:g} s") from None


def _as_reward(value) -> float:
    r = float(value)  # TypeError/ValueError for non-numbers
    if not math.isfinite(r):
        raise ValueError(f"reward is not finite: {r}")
    return r


_warned: set[str] = set()


def _warn_once(e: BaseException) -> None:
    """One warning line per distinct failure (per process): a reward that raises on every sample (a data problem,
    e.g. no gold answer) is then visible, not only a count in reward/errors."""
    msg = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
    if msg not in _warned and len(_warned) < 20:
        _warned.add(msg)
        log.warning(f"reward failed (scored 0, counted in reward/errors): {msg}")


def _score_one(task, response: str, sample, timeout: float | None) -> tuple[float, str]:
    """(reward, status) with status "ok" | "error" | "timeout"; never raises (except BaseException)."""
    try:
        return _as_reward(call_with_timeout(task.reward, timeout, response, sample)), "ok"
    except RewardTimeout:
        return 0.0, "timeout"
    except (Exception, SystemExit) as e:  # noqa: BLE001 - a broken reward is scored 0 and counted
        _warn_once(e)
        return 0.0, "error"


def _metrics(statuses: list[str], seconds: float) -> dict[str, float]:
    return {
        "reward/errors": float(statuses.count("error")),
        "reward/timeouts": float(statuses.count("timeout")),
        "reward/time_s": seconds,
    }


# ----------------------------------------------------------------------------- worker processes


def _worker_main(conn, timeout: float | None) -> None:
    tasks: dict[str, object] = {}
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        job_id, key, blob, response, sample = msg
        try:
            if blob is not None:
                tasks.clear()  # keep one task per worker
                tasks[key] = pickle.loads(blob)  # may import modules: not part of the timed call
            conn.send(("start", job_id, None))
            result = _score_one(tasks[key], response, sample, timeout)
        except Exception:  # noqa: BLE001 - e.g. the task failed to unpickle
            result = (0.0, "error")
        conn.send(("done", job_id, result))


class _Worker:
    def __init__(self, ctx, timeout: float | None):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, timeout), daemon=True)
        self.proc.start()
        child.close()
        self.task_key: str | None = None
        self.job = None  # (job_id, future, deadline)

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


def _set_result(fut: cf.Future, value) -> None:
    try:
        fut.set_result(value)
    except cf.InvalidStateError:  # already given up on
        pass


class RewardPool:
    """Scores ``task.reward(response, sample)`` calls with timeouts; failures score 0 and are counted."""

    def __init__(self, num_workers: int = 2, timeout: float | None = 10.0, mode: str = "process",
                 start_method: str = "spawn", grace: float = 2.0, startup_timeout: float = 120.0):
        if mode not in ("process", "thread", "inline"):
            raise ValueError(f"RewardPool: mode must be process, thread or inline, got {mode!r}")
        if num_workers < 1:
            raise ValueError(f"RewardPool: num_workers must be >= 1, got {num_workers}")
        if start_method not in ("spawn", "forkserver"):
            raise ValueError(f"RewardPool: start_method must be spawn or forkserver (fork is unsafe with threads), got {start_method!r}")
        self.mode, self.num_workers, self.timeout, self.grace = mode, num_workers, timeout, grace
        self.start_method, self.startup_timeout = start_method, startup_timeout
        self.replaced_workers = 0
        self._threads: cf.ThreadPoolExecutor | None = None
        self._jobs: queue.Queue = queue.Queue()
        self._dispatcher: threading.Thread | None = None
        self._closed = False
        self._blobs: dict[int, tuple[object, str, bytes]] = {}
        self._lock = threading.Lock()

    # -- public API
    def submit(self, task, response: str, sample) -> cf.Future:
        """A future of ``(reward, status)``, status "ok" | "error" | "timeout"."""
        if self._closed:
            raise RuntimeError("RewardPool is closed")
        fut: cf.Future = cf.Future()
        if self.mode == "inline":
            fut.set_result(_score_one(task, response, sample, self.timeout))
        elif self.mode == "thread":
            if self._threads is None:
                self._threads = cf.ThreadPoolExecutor(self.num_workers, thread_name_prefix="reward")
            self._threads.submit(self._thread_job, fut, task, response, sample)
        else:
            key, blob = self._pickled(task)
            self._ensure_dispatcher()
            self._jobs.put((fut, key, blob, response, sample))
        return fut

    def score(self, task, items: list[tuple[str, object]]) -> tuple[list[float], dict[str, float]]:
        """Rewards for ``[(response, sample), ...]`` (in order) and counts of errors and timeouts."""
        t0 = time.perf_counter()
        results = [f.result() for f in [self.submit(task, r, s) for r, s in items]]
        return [r for r, _ in results], _metrics([s for _, s in results], time.perf_counter() - t0)

    async def ascore(self, task, items: list[tuple[str, object]]) -> tuple[list[float], dict[str, float]]:
        """`score` for asyncio code: the event loop keeps running while rewards are computed."""
        t0 = time.perf_counter()
        futs = [asyncio.wrap_future(self.submit(task, r, s)) for r, s in items]
        results = await asyncio.gather(*futs)
        return [r for r, _ in results], _metrics([s for _, s in results], time.perf_counter() - t0)

    def close(self) -> None:
        """Stop the workers (jobs already submitted are finished first)."""
        if self._closed:
            return
        self._closed = True
        if self._dispatcher is not None:
            self._jobs.put(None)
            self._dispatcher.join(timeout=30)
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- helpers
    def _thread_job(self, fut: cf.Future, task, response: str, sample) -> None:
        timer = None
        if self.timeout:  # the call is stuck in C code: give up on it; its thread stays busy until it returns
            timer = threading.Timer(self.timeout + self.grace, _set_result, (fut, (0.0, "timeout")))
            timer.daemon = True
            timer.start()
        result = _score_one(task, response, sample, self.timeout)
        if timer is not None:
            timer.cancel()
        _set_result(fut, result)

    def _pickled(self, task) -> tuple[str, bytes]:
        with self._lock:
            hit = self._blobs.get(id(task))
            if hit is not None and hit[0] is task:
                return hit[1], hit[2]
            try:
                blob = pickle.dumps(task)
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"RewardPool(mode='process'): task {getattr(task, 'name', task)!r} cannot be pickled ({e}); "
                                 "define it at module level or set task.reward_isolation=thread") from None
            key = hashlib.sha1(blob).hexdigest()
            self._blobs = {id(task): (task, key, blob)}  # the task of the current batch
            return key, blob

    def _ensure_dispatcher(self) -> None:
        with self._lock:
            if self._dispatcher is None:
                self._dispatcher = threading.Thread(target=self._dispatch, name="reward-dispatch", daemon=True)
                self._dispatcher.start()

    def _take_jobs(self, pending: list, block: bool) -> bool:
        """Move queued jobs to `pending`; True when close() asked to stop."""
        try:
            item = self._jobs.get() if block else self._jobs.get_nowait()
            while True:
                if item is None:
                    return True
                pending.append(item)
                item = self._jobs.get_nowait()
        except queue.Empty:
            return False

    def _dispatch(self) -> None:
        """The one thread that talks to the worker processes."""
        ctx = mp.get_context(self.start_method)
        hard = self.timeout + self.grace if self.timeout else None
        workers: list[_Worker] = []
        pending: list = []
        stopping = False
        next_id = 0
        try:
            while True:
                idle = not pending and all(w.job is None for w in workers)
                if stopping and idle:
                    return
                if not stopping:
                    stopping = self._take_jobs(pending, block=idle)
                # hand out jobs, starting workers lazily
                for w in [w for w in workers if w.job is None] + [None] * (self.num_workers - len(workers)):
                    if not pending:
                        break
                    fut, key, blob, response, sample = pending.pop(0)
                    if not fut.set_running_or_notify_cancel():
                        continue
                    if w is None:
                        w = _Worker(ctx, self.timeout)
                        workers.append(w)
                    try:
                        w.conn.send((next_id, key, None if w.task_key == key else blob, response, sample))
                        w.task_key = key
                        w.job = (next_id, fut, time.monotonic() + self.startup_timeout)  # until the call starts
                    except Exception:  # noqa: BLE001 - e.g. the sample cannot be pickled
                        fut.set_result((0.0, "error"))
                    next_id += 1
                # collect results; kill workers that crashed or ran past the hard deadline
                active = [w for w in workers if w.job is not None]
                if not active:
                    continue
                ready = mp_wait([w.conn for w in active] + [w.proc.sentinel for w in active], timeout=0.05)
                for w in active:
                    status = None
                    try:
                        while w.job is not None and w.conn.poll():
                            tag, got_id, result = w.conn.recv()
                            job_id, fut, _ = w.job
                            if got_id != job_id:
                                raise OSError("out-of-order reply")
                            if tag == "start":  # the reward call begins now: its own deadline
                                w.job = (job_id, fut, None if hard is None else time.monotonic() + hard)
                            else:
                                fut.set_result(result)
                                w.job = None
                    except (EOFError, OSError):
                        status = "error"  # the worker died (segfault, OOM kill, os._exit)
                    if w.job is None:
                        continue
                    job_id, fut, deadline = w.job
                    if status is None and w.proc.sentinel in ready and not w.proc.is_alive():
                        status = "error"
                    if status is None and deadline is not None and time.monotonic() > deadline:
                        status = "timeout"
                    if status is not None:
                        w.kill()
                        workers.remove(w)  # a fresh one starts when a job needs it
                        self.replaced_workers += 1
                        fut.set_result((0.0, status))
        finally:
            for w in workers:
                try:
                    w.conn.send(None)
                except Exception:  # noqa: BLE001
                    pass
                w.proc.join(timeout=2)
                w.kill()
            for fut, *_ in pending:
                _set_result(fut, (0.0, "error"))


# ----------------------------------------------------------------------------- the one path of a run's rewards

ISOLATION = ("auto", "process", "thread", "inline")  # task.reward_isolation


class Scorer:
    """``await scorer(task, [(response, sample), ...])`` -> ``[(reward, status), ...]`` in order, through one
    RewardPool. Process and thread pools run off the calling event loop (their futures are awaited); inline runs
    on it, which only tasks that declare their reward cannot hang choose under ``auto``."""

    def __init__(self, mode: str, timeout: float | None, num_workers: int = 2):
        self.mode = mode
        self.pool = RewardPool(num_workers=num_workers, timeout=timeout, mode=mode)

    async def __call__(self, task, items: list[tuple[str, object]]) -> list[tuple[float, str]]:
        return list(await asyncio.gather(*[asyncio.wrap_future(self.pool.submit(task, r, s)) for r, s in items]))

    def close(self) -> None:
        self.pool.close()


def declared_isolation(task) -> str:
    """The task's `reward_isolation`, if the class declaring it is the one whose `reward` runs (or a subclass of
    it): a subclass that overrides a built-in's reward without declaring its own runs user code, so "process"."""
    mro = type(task).__mro__
    reward_at = next(i for i, c in enumerate(mro) if "reward" in c.__dict__)
    declared_at = next(i for i, c in enumerate(mro) if "reward_isolation" in c.__dict__)
    return task.reward_isolation if declared_at <= reward_at else "process"


def resolved_isolation(task, choice: str) -> str:
    """``auto``: the task's declaration (`declared_isolation`); otherwise the configured mode."""
    if choice not in ISOLATION:
        raise ValueError(f"task.reward_isolation: unknown value {choice!r}; valid: {', '.join(ISOLATION)}")
    return declared_isolation(task) if choice == "auto" else choice


def make_scorer(task, tcfg) -> Scorer:
    """The scorer of a run from its TaskConfig (reward_isolation, reward_timeout, reward_workers). A task that
    declares its reward inline (it cannot hang) runs it under ``auto`` without the timeout's watchdog thread
    (~0.2 ms a call); a configured ``inline`` keeps it."""
    mode = resolved_isolation(task, tcfg.reward_isolation)
    bounded = tcfg.reward_isolation == "auto" and mode == "inline"
    return Scorer(mode, None if bounded else tcfg.reward_timeout or None, tcfg.reward_workers)


def reward_fault_metrics(trajs) -> dict[str, float]:
    """``reward/errors`` and ``reward/timeouts``: responses of `trajs` whose reward failed and scored 0."""
    statuses = [t.metrics.get("reward_status", "ok") for t in trajs]
    return {"reward/errors": float(statuses.count("error")), "reward/timeouts": float(statuses.count("timeout"))}
