"""RewardPool and call_with_timeout: errors, hangs (Python and C level), crashes never stop scoring."""
from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

from thinkrl.tasks.base import Task
from thinkrl.tasks.isolation import RewardPool, RewardTimeout, call_with_timeout
from thinkrl.types import Sample


class Moody(Task):
    """Reward depends on the response: a number, or a misbehaviour."""

    name = "moody"

    def reward(self, response: str, sample: Sample) -> float:
        if response == "raise":
            raise RuntimeError("broken reward")
        if response == "nan":
            return float("nan")
        if response == "text":
            return "high"  # type: ignore[return-value]
        if response == "spin":  # pure-Python hang: interruptible
            n = 0
            while n >= 0:
                n += 1
        if response == "sleep":  # stuck in one C call: only killing the process helps
            time.sleep(60)
        if response == "crash":
            os._exit(3)
        return float(response) * sample.answer


def _spin() -> None:
    n = 0
    while n >= 0:
        n += 1


def test_call_with_timeout_interrupts_python_in_any_thread():
    assert call_with_timeout(lambda a, b: a + b, 1.0, 2, 3) == 5
    out = []

    def worker():
        t0 = time.perf_counter()
        try:
            call_with_timeout(_spin, 0.2)
        except RewardTimeout:
            out.append(time.perf_counter() - t0)

    th = threading.Thread(target=worker)
    th.start()
    th.join(timeout=10)
    assert len(out) == 1 and 0.15 < out[0] < 2.0


def test_call_with_timeout_leaves_no_stray_exception_behind():
    # many calls that finish right around their deadline: each either returns or raises RewardTimeout,
    # and nothing leaks into the code that runs afterwards
    outcomes = []
    for i in range(200):
        try:
            outcomes.append(call_with_timeout(lambda: sum(range(2000)), 0.0001 * (i % 5 + 1)))
        except RewardTimeout:
            outcomes.append("timeout")
        x = 0
        for _ in range(20000):
            x += 1
    assert all(o in (sum(range(2000)), "timeout") for o in outcomes)


ITEMS = [("2", Sample("a", "p", 1.5)), ("raise", Sample("b", "p", 1)), ("nan", Sample("c", "p", 1)),
         ("text", Sample("d", "p", 1)), ("spin", Sample("e", "p", 1)), ("3", Sample("f", "p", 2.0))]


@pytest.mark.parametrize("mode", ["inline", "thread"])
def test_in_process_modes_score_failures_zero_and_count_them(mode):
    with RewardPool(num_workers=2, timeout=0.3, mode=mode) as pool:
        rewards, m = pool.score(Moody(), ITEMS)
    assert rewards == [3.0, 0.0, 0.0, 0.0, 0.0, 6.0]
    assert m["reward/errors"] == 3 and m["reward/timeouts"] == 1


def test_process_mode_kills_c_level_hangs_and_crashes_and_keeps_going():
    items = ITEMS + [("sleep", Sample("g", "p", 1)), ("crash", Sample("h", "p", 1)), ("4", Sample("i", "p", 0.5))]
    t0 = time.perf_counter()
    with RewardPool(num_workers=2, timeout=0.5, grace=0.5, mode="process") as pool:
        rewards, m = pool.score(Moody(), items)
        assert rewards == [3.0, 0.0, 0.0, 0.0, 0.0, 6.0, 0.0, 0.0, 2.0]
        assert (m["reward/errors"], m["reward/timeouts"]) == (4, 2)
        assert pool.replaced_workers == 2  # the sleeping and the crashed worker
        # the pool still works afterwards, also from asyncio code
        rewards, m = asyncio.run(pool.ascore(Moody(), [("1", Sample("j", "p", 7.0))]))
        assert rewards == [7.0] and m["reward/errors"] == 0
    assert time.perf_counter() - t0 < 25


def test_unpicklable_task_is_a_clear_error_in_process_mode():
    class Local(Task):
        def reward(self, response, sample):
            return 1.0

    with RewardPool(num_workers=1, mode="process") as pool:
        with pytest.raises(ValueError, match="cannot be pickled"):
            pool.score(Local(), [("x", Sample("a", "p"))])
    with RewardPool(mode="thread") as pool:
        assert pool.score(Local(), [("x", Sample("a", "p"))])[0] == [1.0]


def test_bad_pool_arguments():
    with pytest.raises(ValueError, match="mode"):
        RewardPool(mode="gpu")
    with pytest.raises(ValueError, match="fork"):
        RewardPool(start_method="fork")
