"""`thinkrl simulate`: a discrete-event model of sync vs async vs partial-rollout RL.

A decode step on an inference device advances each running sequence by one token and takes
`decode_a + decode_b * running` s; admitting a sequence costs a `prompt_len`-token prefill. Modes:
sync (generate a batch, wait for its longest sample, train, push weights), colocated (sync on one
pool of n_infer + n_train devices), async (generation runs ahead: with trainer version v at most
(eta + v + 1) * batch_size samples started; on new weights a device drains its in-flight sequences,
then loads), async_partial (in-flight sequences are paused, weights swapped, KV optionally
recomputed, generation goes on). The trainer takes the oldest policies' finished samples first and
waits rather than let one exceed eta, so staleness <= eta. See docs/simulator.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import math
import sys
from dataclasses import dataclass

import numpy as np

MODES = ("sync", "colocated", "async", "async_partial")
_EPS = 1e-9


@dataclass
class SimConfig:
    mode: str = "async_partial"
    steps: int = 20                     # train steps to simulate
    batch_size: int = 64                # samples per train step (prompts x n)
    max_staleness: int = 1              # eta (async modes)
    n_infer: int = 1                    # inference devices
    n_train: int = 1                    # training devices (train cost is divided over them)
    len_median: float = 60.0            # response lengths: lognormal(median, sigma) capped at max_len...
    len_sigma: float = 0.7
    max_len: int = 200
    lengths: list[int] | None = None    # ...or these lengths, used in order (cycled)
    prompt_len: int = 40
    decode_a: float = 3.5e-3            # s per decode step (fixed part)
    decode_b: float = 7e-5              # s per decode step per running sequence
    max_concurrency: int = 64           # running sequences per inference device
    prefill_per_token: float = 5e-5     # s per prompt token (also KV recompute after a swap)
    train_per_token: float = 1.5e-4     # s per trained token on ONE training device
    sync_s: float = 1e-3                # weight push/load per update
    recompute_kv: bool = False          # async_partial: recompute in-flight KV after a swap (AReaL)
    seed: int = 0

    def validate(self) -> SimConfig:
        """Raise ValueError("<field>: <problem>") for the first bad field; return self."""
        if self.mode not in MODES:
            raise ValueError(f"mode: must be one of {', '.join(MODES)}, got {self.mode!r}")
        lows = {"steps": 1, "batch_size": 1, "n_infer": 1, "n_train": 1, "max_len": 1, "max_concurrency": 1,
                "max_staleness": 0, "prompt_len": 0, "seed": 0, "len_median": 1.0, "len_sigma": 0.0,
                "decode_a": 1e-12, "decode_b": 0.0, "prefill_per_token": 0.0, "train_per_token": 0.0, "sync_s": 0.0}
        for k, lo in lows.items():
            x, kind = getattr(self, k), int if isinstance(lo, int) else (int, float)
            if isinstance(x, bool) or not isinstance(x, kind) or not x >= lo:
                raise ValueError(f"{k}: must be {'an integer' if kind is int else 'a number'} >= {lo:g}, got {x!r}")
        if self.lengths is not None and not (self.lengths and all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in self.lengths)):
            raise ValueError(f"lengths: must be a non-empty list of integers >= 1, got {self.lengths!r}")
        return self


PRESETS = {
    # Micro model (thinkrl.models.micro) measured on this 2-core CPU, one torch thread per device: embedded
    # engine decode ~3.5 ms/step at 1 sequence, ~8 ms at 64; prefill ~5e-5 s/token; train ~1.5e-4 s/token.
    "cpu": SimConfig(),
    # A GPU-like setting (assumed, not measured): a ~7B model on H100-class devices, 8 + 8 devices,
    # long-tailed lengths up to 16k tokens, 512 samples (e.g. 64 prompts x 8) per step.
    "gpu": SimConfig(steps=20, batch_size=512, n_infer=8, n_train=8, len_median=3000.0, len_sigma=0.9,
                     max_len=16384, prompt_len=300, decode_a=0.012, decode_b=1e-4, max_concurrency=256,
                     prefill_per_token=4e-5, train_per_token=1.5e-4, sync_s=3.0),
}


@dataclass
class SimResult:
    mode: str
    max_staleness: int
    total_s: float                  # until the last train step ends
    samples_per_s: float            # trained samples / total_s
    tokens_per_s: float             # trained (prompt + response) tokens / total_s
    infer_util: float               # decoded tokens / what the devices decode at full concurrency
    infer_busy: float               # fraction of inference-device time decoding or prefilling
    train_util: float               # fraction of training-device time spent in train steps
    staleness_mean: float
    staleness_max: int
    tail_idle_s: float | None       # sync modes: time a finished sample's slot waits for the step's longest
    tail_idle_frac: float | None    # tail_idle_s / total_s (None in async modes: there is no step barrier)


class _Device:
    """One inference device. `clock` counts decode steps taken, so a sequence admitted at clock c with
    length L finishes when clock reaches c + L: advancing time is O(1)."""

    def __init__(self, cfg: SimConfig):
        self.cfg, self.clock, self.running = cfg, 0.0, []  # running: heap of (end_clock, idx, start_clock)
        self.free_at = 0.0                # busy prefilling / loading weights until then (no decoding)
        self.version, self.loaded_at = 0, 0.0  # weights of `version` usable from `loaded_at` on
        self.tokens = self.busy_s = 0.0   # tokens decoded; seconds spent decoding or prefilling

    def step_s(self) -> float:
        return self.cfg.decode_a + self.cfg.decode_b * len(self.running)

    def next_event(self, t: float) -> float:
        if self.free_at > t + _EPS:
            return self.free_at
        return t + (self.running[0][0] - self.clock) * self.step_s() if self.running else math.inf

    def advance(self, t: float, t1: float) -> list[int]:
        """Decode from t to t1 (no event in between); return the indices of finished sequences."""
        dt = t1 - max(t, self.free_at)
        if dt > 0 and self.running:
            steps = dt / self.step_s()
            self.clock += steps
            self.tokens += steps * len(self.running)
            self.busy_s += dt
        done = []
        while self.running and self.running[0][0] <= self.clock + 1e-6:
            done.append(heapq.heappop(self.running)[1])
        return done

    def busy(self, t: float, seconds: float, prefill: bool) -> None:
        self.free_at = max(t, self.free_at) + seconds
        self.busy_s += seconds if prefill else 0.0

    def admit(self, t: float, idx: int, length: int) -> None:
        heapq.heappush(self.running, (self.clock + length, idx, self.clock))
        self.busy(t, self.cfg.prefill_per_token * self.cfg.prompt_len, prefill=True)

    def load(self, t: float, version: int, partial: bool) -> None:
        self.busy(t, self.cfg.sync_s, prefill=False)
        self.version, self.loaded_at = version, self.free_at
        if partial and self.cfg.recompute_kv:  # KV of in-flight tokens was computed by the old weights
            toks = sum(self.cfg.prompt_len + self.clock - c0 for _, _, c0 in self.running)
            self.busy(t, self.cfg.prefill_per_token * toks, prefill=True)


def _lengths(cfg: SimConfig) -> np.ndarray:
    """Response length of sample i (the i-th started), the same in every mode for a given seed."""
    n = (cfg.steps + cfg.max_staleness + 2) * cfg.batch_size
    if cfg.lengths is not None:
        return np.resize(np.asarray(cfg.lengths, dtype=np.int64), n)
    z = np.random.default_rng(cfg.seed).standard_normal(n)
    return np.clip(np.rint(cfg.len_median * np.exp(cfg.len_sigma * z)), 1, cfg.max_len).astype(np.int64)


def _admit(devs: list[_Device], t: float, idx: int, length: int, eligible=lambda d: True) -> bool:
    """Start sample idx on the least-loaded eligible device with a free slot; False if there is none."""
    cands = [d for d in devs if len(d.running) < d.cfg.max_concurrency and eligible(d)]
    if cands:
        min(cands, key=lambda d: len(d.running)).admit(t, idx, length)
    return bool(cands)


def _advance_all(devs: list[_Device], t: float, extra: float = math.inf) -> tuple[float, list[int]]:
    """Move to the next event (a device event or `extra`); return its time and the finished samples."""
    t1 = min([d.next_event(t) for d in devs] + [extra])
    if t1 == math.inf:
        raise RuntimeError("simulation stalled: no pending event")
    return t1, [i for d in devs for i in d.advance(t, t1)]


def _run_sync(cfg: SimConfig, lens: np.ndarray, devs: list[_Device], n_train: int):
    B, cap = cfg.batch_size, len(devs) * cfg.max_concurrency
    t = train_s = tail = 0.0
    for step in range(cfg.steps):
        queue, waits = list(range(step * B, (step + 1) * B)), []
        while queue or any(d.running for d in devs):
            while queue and _admit(devs, t, queue[0], int(lens[queue[0]])):
                queue.pop(0)
            t, done = _advance_all(devs, t)
            waits += [t] * (len(done) if not queue else 0)  # slots that stay empty until the step ends
        tail += sum(t - w for w in waits) / min(B, cap)
        dt = cfg.train_per_token * float(np.sum(lens[step * B:(step + 1) * B] + cfg.prompt_len)) / n_train
        t, train_s = t + dt, train_s + dt
        if step < cfg.steps - 1:  # the last push is not counted (nor in the async modes)
            for d in devs:
                d.load(t, step + 1, partial=False)
            t += cfg.sync_s
    return t, train_s, [0] * (cfg.steps * B), tail, float(np.sum(lens[: cfg.steps * B] + cfg.prompt_len))


def _run_async(cfg: SimConfig, lens: np.ndarray, devs: list[_Device]):
    B, eta, partial = cfg.batch_size, cfg.max_staleness, cfg.mode == "async_partial"
    t = train_s = toks = 0.0
    v = started = 0                                # trainer version; samples started so far
    start_v: list[int] = []                        # sample idx -> version that started it
    outstanding = [0] * cfg.steps                  # started, not yet trained, per start version
    done: list[list[int]] = [[] for _ in range(cfg.steps)]  # finished, not yet trained, per start version
    stale: list[int] = []
    phase, train_end = "idle", math.inf            # idle | train | sync (waiting until all devices load v)
    while True:
        if phase == "train" and t >= train_end - _EPS:
            v, phase, train_end = v + 1, "sync", math.inf
            if v == cfg.steps:
                return t, train_s, stale, None, toks
        for d in devs:
            if d.version < v and (partial or not d.running):
                d.load(t, v, partial)
        if phase == "sync" and all(d.version == v and d.loaded_at <= t + _EPS for d in devs):
            phase = "idle"
        while started < (eta + v + 1) * B and _admit(
                devs, t, started, int(lens[started]), lambda d: d.version == v and d.loaded_at <= t + _EPS):
            start_v.append(v)
            outstanding[v], started = outstanding[v] + 1, started + 1
        if phase == "idle" and (take := _take(outstanding, done, v, eta, B)):
            batch = [i for s, k in take.items() for i in done[s][:k]]
            for s, k in take.items():
                del done[s][:k]
                outstanding[s] -= k
            stale += [v - start_v[i] for i in batch]
            n_tok = float(np.sum(lens[batch] + cfg.prompt_len))
            dt = cfg.train_per_token * n_tok / cfg.n_train
            phase, train_end, train_s, toks = "train", t + dt, train_s + dt, toks + n_tok
        loads = [d.loaded_at for d in devs if d.loaded_at > t + _EPS]
        t, finished = _advance_all(devs, t, min([train_end] + loads))
        for i in finished:
            done[start_v[i]].append(i)


def _take(outstanding: list[int], done: list[list[int]], v: int, eta: int, B: int) -> dict[int, int] | None:
    """The next batch as {start version: count}: the B finished samples of the oldest policies, or None
    to wait. Earliest deadline first: a sample started at version s must be trained by version s + eta,
    so for j = 0..eta the samples left that are due by version v + j must fit in the j batches after
    this one (j = 0: every due sample is in this batch)."""
    take, need = {}, B
    for s in range(v + 1):
        if need and done[s]:
            take[s] = min(need, len(done[s]))
            need -= take[s]
    left = 0
    for j in range(eta + 1):
        s = v + j - eta  # samples started at versions <= s are due by version v + j
        left += outstanding[s] - take.get(s, 0) if s >= 0 else 0
        if left > j * B:
            return None
    return None if need else take


def simulate(cfg: SimConfig) -> SimResult:
    """Run one simulation; deterministic for a given config (seed included)."""
    cfg.validate()
    lens, colocated = _lengths(cfg), cfg.mode == "colocated"
    n_dev = cfg.n_infer + cfg.n_train if colocated else cfg.n_infer
    devs = [_Device(cfg) for _ in range(n_dev)]
    if cfg.mode in ("sync", "colocated"):
        total, train_s, stale, tail, toks = _run_sync(cfg, lens, devs, n_dev if colocated else cfg.n_train)
    else:
        total, train_s, stale, tail, toks = _run_async(cfg, lens, devs)
    n, dev_time, c = cfg.steps * cfg.batch_size, total * n_dev, cfg.max_concurrency
    peak = c / (cfg.decode_a + cfg.decode_b * c)  # tokens/s of one device at full concurrency
    return SimResult(
        mode=cfg.mode, max_staleness=cfg.max_staleness if cfg.mode.startswith("async") else 0,
        total_s=total, samples_per_s=n / total, tokens_per_s=toks / total,
        infer_util=sum(d.tokens for d in devs) / (dev_time * peak),
        infer_busy=min(1.0, sum(d.busy_s for d in devs) / dev_time),
        train_util=train_s / total, staleness_mean=float(np.mean(stale)), staleness_max=int(max(stale)),
        tail_idle_s=tail, tail_idle_frac=None if tail is None else tail / total)


def compare(cfg: SimConfig, etas: tuple[int, ...] = (1, 2, 4)) -> list[SimResult]:
    """sync, colocated, then async and async_partial for each eta, all on the same sampled lengths."""
    runs = [("sync", 0), ("colocated", 0)] + [(m, e) for m in ("async", "async_partial") for e in etas]
    return [simulate(dataclasses.replace(cfg, mode=m, max_staleness=e)) for m, e in runs]


def format_table(results: list[SimResult]) -> str:
    """A text table; speedup is trained tokens/s relative to the first row."""
    rows = [f"{'mode':<14}{'eta':>4}{'time_s':>10}{'samples/s':>11}{'tokens/s':>11}{'speedup':>8}"
            f"{'infer_util':>11}{'infer_busy':>11}{'train_util':>11}{'stale':>11}{'tail_idle':>10}"]
    for r in results:
        tail = "-" if r.tail_idle_frac is None else f"{100 * r.tail_idle_frac:.0f}%"
        rows.append(f"{r.mode:<14}{r.max_staleness:>4}{r.total_s:>10.4g}{r.samples_per_s:>11.4g}"
                    f"{r.tokens_per_s:>11.4g}{r.tokens_per_s / results[0].tokens_per_s:>7.2f}x"
                    f"{r.infer_util:>11.2f}{r.infer_busy:>11.2f}{r.train_util:>11.2f}"
                    f"{f'{r.staleness_mean:.2f}/{r.staleness_max}':>11}{tail:>10}")
    return "\n".join(rows)


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def main(argv: list[str]) -> int:
    """`thinkrl simulate [--preset cpu|gpu] [--KNOB VALUE ...] [--etas 1,2,4] [--json]`."""
    p = argparse.ArgumentParser(prog="thinkrl simulate", description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    knobs = [f for f in dataclasses.fields(SimConfig) if f.name not in ("mode", "max_staleness", "recompute_kv")]
    for f in knobs:  # --steps, --batch-size, ..., --lengths 100,2000 (used in order instead of lognormal)
        kind = _int_list if f.name == "lengths" else type(f.default)
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None)
    p.add_argument("--recompute-kv", action="store_true", help="async_partial recomputes in-flight KV on a swap")
    p.add_argument("--etas", type=_int_list, default=[1, 2, 4], help="max_staleness values for the async modes")
    p.add_argument("--json", action="store_true", help="also print one JSON object on the last line")
    a = p.parse_args(argv)
    over = {f.name: getattr(a, f.name) for f in knobs if getattr(a, f.name) is not None}
    try:
        cfg = dataclasses.replace(PRESETS[a.preset], **over, recompute_kv=a.recompute_kv).validate()
        results = compare(cfg, tuple(a.etas))
    except ValueError as e:
        print(f"thinkrl simulate: error: {e}", file=sys.stderr)
        return 2
    print(f"preset={a.preset} steps={cfg.steps} batch_size={cfg.batch_size} devices={cfg.n_infer}+{cfg.n_train}")
    print(format_table(results))
    if a.json:
        conf = {k: x for k, x in dataclasses.asdict(cfg).items() if k not in ("mode", "max_staleness")}
        print(json.dumps({"preset": a.preset, "config": conf, "results": [dataclasses.asdict(r) for r in results]}))
    return 0
