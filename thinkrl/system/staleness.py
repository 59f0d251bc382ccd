"""The staleness bound η: which prompt groups may start, and which finished groups the trainer takes.

Units: the bound counts prompt groups (one prompt, rollout.n answers); a batch is B = rollout.batch_prompts groups.
Group j is stream position j of the training data (thinkrl.data.batch_for_step), so every mode sees the same
prompts in the same order.

- Admission: with trainer version v (steps done), group j may start only when j < (η + v + 1 + extra) x B,
  `extra` being the batches a batch filter asked for on top (`request_more`, dynamic sampling). The version of a
  group is the policy version when it started (= the lowest version of its tokens); its staleness when trained
  at version V is V - version.
- The pick: the trainer never trains a group with staleness > η. It takes the B finished groups started earliest
  (earliest deadline first) and WAITS while taking them would leave a group that could no longer be trained in
  time. Nothing is dropped. With η = 0 this is exactly the synchronous loop (tested).
- Admission policy: `eager` starts every group the bound allows. `adaptive` does too while the trainer has to wait
  for data; once it finds its batch ready READY_STREAK times in a row (training is the bottleneck), at most one
  batch of groups is started ahead of the trainer until it has to wait again. Starting more then buys no
  throughput (every sample is trained, at the trainer's pace): it only makes samples wait and grow stale.
- `state_dict()` is what a checkpoint keeps: finished groups with their trajectories, the indices of groups in
  flight (restarted at the restored version, which only lowers their staleness) and the counters.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

from thinkrl.types import Trajectory


@dataclass
class Group:
    index: int  # global group index j (stream position of its prompt)
    version: int  # policy version when it started
    trajs: list[Trajectory] | None = None  # None while in flight


class StalenessBuffer:
    """Admission (how many groups may start) and the trainer's pick, under staleness bound η. Thread-safe."""

    READY_STREAK = 2

    def __init__(self, batch_groups: int, eta: int, start_step: int = 0, version: int = 0, adaptive: bool = False):
        if batch_groups < 1 or eta < 0:
            raise ValueError(f"StalenessBuffer: need batch_groups >= 1 and eta >= 0, got {batch_groups}, {eta}")
        self.B, self.eta, self.step, self.version = batch_groups, eta, start_step, version
        self.next_index = start_step * batch_groups
        self.extra = 0  # batches requested on top of one per step (request_more)
        self.restart: list[int] = []  # groups in flight at a checkpoint: started again first, in order
        self.groups: dict[int, Group] = {}  # started, not yet trained
        self.error: BaseException | None = None
        self.adaptive, self._streak = adaptive, 0  # streak: takes in a row that found their batch ready
        # called when the bound opens other than by advance(): adaptive admission lifted, or request_more
        self.on_lift: Callable[[], None] | None = None
        self._cv = threading.Condition()

    @property
    def lazy(self) -> bool:
        """Adaptive admission holds the producer to one batch ahead of the trainer."""
        return self.adaptive and self._streak >= self.READY_STREAK

    # ---------------------------------------------------------------- producer side
    def batches_allowed(self) -> int:
        """Batches that may have started by now: η + v + 1, plus those request_more added."""
        return self.eta + self.step + 1 + self.extra

    def may_start(self) -> bool:
        if self.restart:
            return True  # restarted groups were admitted before the checkpoint
        if self.next_index >= self.batches_allowed() * self.B:
            return False
        return not self.lazy or len(self.groups) < self.B

    def try_start(self, version: int | None = None) -> Group | None:
        """The next group, started at `version` (default: the trainer's), or None if the bound says wait."""
        with self._cv:
            if not self.may_start():
                return None
            version = self.version if version is None else version
            if self.restart:
                g = Group(self.restart.pop(0), version)
            else:
                g = Group(self.next_index, version)
                self.next_index += 1
            self.groups[g.index] = g
            return g

    def finish(self, group: Group, trajs: list[Trajectory]) -> None:
        with self._cv:
            group.trajs = trajs
            self._cv.notify_all()

    def fail(self, error: BaseException) -> None:
        with self._cv:
            self.error = self.error or error
            self._cv.notify_all()

    # ---------------------------------------------------------------- trainer side
    def pick(self) -> list[Group] | None:
        """The batch to train at the current version, or None to wait. Earliest deadline (start version) first;
        feasible iff, for u = 0..η, the groups left behind whose deadline (version + η) is at most
        version + u number at most u x B (later batches must be able to take them in time)."""
        done = sorted((g for g in self.groups.values() if g.trajs is not None), key=lambda g: (g.version, g.index))
        if len(done) < self.B:
            return None
        batch = done[: self.B]
        chosen = {g.index for g in batch}
        left = [g.version + self.eta - self.version for g in self.groups.values() if g.index not in chosen]
        for u in range(self.eta + 1):
            if sum(d <= u for d in left) > u * self.B:
                return None
        return sorted(batch, key=lambda g: g.index)

    def take(self, timeout: float | None = None) -> list[Group]:
        """Block until `pick` gives a batch; remove and return it."""
        with self._cv:
            waited = self.error is None and self.pick() is None
            if waited:  # generation is behind: adaptive admission opens the full bound at once
                lifted, self._streak = self.lazy, 0
                if lifted and self.on_lift is not None:
                    self.on_lift()
            ok = self._cv.wait_for(lambda: self.error is not None or self.pick() is not None, timeout)
            if self.error is not None:
                raise RuntimeError(f"rollout failed: {self.error}") from self.error
            if not ok:
                raise TimeoutError(f"no batch after {timeout} s ({self.stats()})")
            if not waited:
                self._streak += 1
            batch = self.pick()
            for g in batch:
                del self.groups[g.index]
            return batch

    def request_more(self) -> None:
        """A batch filter needs another batch of groups at the current version (dynamic sampling)."""
        with self._cv:
            self.extra += 1
            self._cv.notify_all()
        if self.on_lift is not None:
            self.on_lift()

    def advance(self, version: int) -> None:
        """A train step is done and `version` is loaded in the engines: the bound grows by B."""
        with self._cv:
            self.step += 1
            self.version = version
            self._cv.notify_all()

    def stats(self) -> dict:
        done = sum(g.trajs is not None for g in self.groups.values())
        return {"finished": done, "in_flight": len(self.groups) - done, "started": self.next_index,
                "lazy": int(self.lazy)}

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        with self._cv:
            done = [(g.index, g.version, g.trajs) for g in self.groups.values() if g.trajs is not None]
            flight = sorted(self.restart + [g.index for g in self.groups.values() if g.trajs is None])
            return {"step": self.step, "version": self.version, "next_index": self.next_index, "extra": self.extra,
                    "streak": self._streak, "finished": done, "in_flight": flight}

    def load_state_dict(self, state: dict) -> None:
        with self._cv:
            self.step, self.version, self.next_index = state["step"], state["version"], state["next_index"]
            self.extra, self._streak, self.restart = state["extra"], state["streak"], list(state["in_flight"])
            self.groups = {i: Group(i, v, trajs) for i, v, trajs in state["finished"]}
            self._cv.notify_all()


def group_seed(seed: int, index: int) -> int:
    """The sampling seed of group `index` (a pure function: reproducible whatever runs beside it)."""
    return (seed * 1_000_003 + index * 0x9E3779B1 + 0x5BD1E995) & 0xFFFFFFFF


def staleness_metrics(trajs: list[Trajectory], version: int, eta: int) -> dict[str, float]:
    """Per trajectory: version - lowest version of its generated tokens. Mean, max, histogram (fractions)."""
    st, mixed = [], 0
    for t in trajs:
        vs = [v for v, m in zip(t.versions, t.loss_mask) if m and v >= 0] or [version]
        st.append(version - min(vs))
        mixed += min(vs) != max(vs)
    n = max(len(st), 1)
    m = {"staleness/mean": sum(st) / n, "staleness/max": float(max(st, default=0)), "staleness/mixed_frac": mixed / n}
    m.update({f"staleness/frac_{k}": sum(s == k for s in st) / n for k in range(eta + 1)})
    return m
