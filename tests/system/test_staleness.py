"""thinkrl.system.staleness: the bound η by hand, property tests with random speeds (eager and adaptive
admission), the pick's deadlines, dynamic-sampling requests, and the checkpoint state of the buffer."""
from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thinkrl.system.staleness import StalenessBuffer, staleness_metrics
from thinkrl.types import Trajectory


# ----------------------------------------------------------------------------- the buffer, by hand
def test_admission_counts_groups_up_to_eta_plus_v_plus_1_batches():
    buf = StalenessBuffer(batch_groups=2, eta=1)
    started = [buf.try_start() for _ in range(5)]
    assert [g.index for g in started[:4]] == [0, 1, 2, 3] and started[4] is None  # (1 + 0 + 1) x 2 = 4
    assert {g.version for g in started[:4]} == {0}
    buf.advance(1)
    assert buf.try_start().index == 4 and buf.try_start().index == 5 and buf.try_start() is None
    resumed = StalenessBuffer(batch_groups=2, eta=0, start_step=3, version=3)  # resume at step 3
    assert [resumed.try_start().index for _ in range(2)] == [6, 7] and resumed.try_start() is None


def test_trainer_waits_rather_than_strand_an_old_group():
    # η = 2, B = 1: g0, g1, g2 start at version 0; g2 finishes first and is trained (v -> 1); g3 starts at v1 and
    # finishes. Training g3 now would leave g0 and g1 (both due by version 2) for the single batch at version 2:
    # the buffer must wait for g0 instead.
    buf = StalenessBuffer(batch_groups=1, eta=2)
    g = [buf.try_start() for _ in range(3)]
    assert buf.try_start() is None
    buf.finish(g[2], ["t2"])
    assert [x.index for x in buf.take()] == [2]
    buf.advance(1)
    g3 = buf.try_start()
    buf.finish(g3, ["t3"])
    assert buf.pick() is None  # oldest-first would have taken g3
    buf.finish(g[0], ["t0"])
    assert [x.index for x in buf.take()] == [0]
    buf.advance(2)
    assert buf.pick() is None  # g1 (deadline now) is not finished: nothing else may go first
    buf.finish(g[1], ["t1"])
    assert [x.index for x in buf.take()] == [1]


def test_eta0_takes_exactly_the_sync_batches_in_order():
    buf = StalenessBuffer(batch_groups=3, eta=0)
    for step in range(3):
        gs = [buf.try_start() for _ in range(3)]
        assert buf.try_start() is None
        for x in reversed(gs):
            assert buf.pick() is None or x is gs[0]
            buf.finish(x, [x.index])
        assert [x.index for x in buf.take()] == [3 * step, 3 * step + 1, 3 * step + 2]
        buf.advance(step + 1)


def test_adaptive_admission_keeps_one_batch_ahead_while_the_trainer_finds_data_ready():
    B = 2
    buf = StalenessBuffer(batch_groups=B, eta=2, adaptive=True)
    gs = [buf.try_start() for _ in range(6)]  # eager at first: the whole bound, (2 + 0 + 1) x 2
    assert buf.try_start() is None and not buf.lazy
    for g in gs:
        buf.finish(g, ["t"])
    for v in (1, 2):  # two takes that find their batch ready
        buf.take()
        buf.advance(v)
    assert buf.lazy and len(buf.groups) == B
    assert buf.try_start() is None  # the bound would allow 4 more; one batch is already started ahead
    buf.take()
    buf.advance(3)
    new = [buf.try_start() for _ in range(B)]
    assert all(new) and buf.try_start() is None  # one batch ahead, started at the current version
    assert {g.version for g in new} == {3}
    lifted = []
    buf.on_lift = lambda: lifted.append(buf.lazy)
    with pytest.raises(TimeoutError):
        buf.take(timeout=0.01)  # the trainer has to wait: generation is behind
    assert lifted == [False] and not buf.lazy
    assert sum(buf.try_start() is not None for _ in range(10)) == (2 + 3 + 1) * B - 8  # the full bound again


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 3), st.integers(0, 3), st.integers(0, 2**32 - 1), st.integers(3, 8), st.booleans())
def test_staleness_bound_with_random_speeds(B, eta, seed, steps, adaptive):
    """Random generation speeds (finish order, how much finishes between trainer looks) and training speeds:
    the trainer never takes a group older than η, admission never exceeds the bound, and it never deadlocks
    (eager and adaptive admission)."""
    rnd = random.Random(seed)
    buf = StalenessBuffer(B, eta, adaptive=adaptive)
    in_flight: list = []
    version = 0
    while version < steps:
        lazy, n0, i0, bound = buf.lazy, len(buf.groups), buf.next_index, (eta + version + 1) * B
        while (g := buf.try_start()) is not None:  # the producer starts everything it may
            in_flight.append(g)
        assert buf.next_index <= bound
        assert buf.next_index - i0 == (max(0, min(B - n0, bound - i0)) if lazy else bound - i0)
        for _ in range(rnd.randint(0, len(in_flight))):  # a random subset finishes, in random order
            buf.finish(in_flight.pop(rnd.randrange(len(in_flight))), ["t"])
        if rnd.random() < 0.5:  # the trainer is slow: it does not look this time
            continue
        batch = buf.pick()
        if batch is None:
            assert in_flight, "nothing in flight and no batch: deadlock"
            with pytest.raises(TimeoutError):
                buf.take(timeout=0)  # the trainer waits (and adaptive admission opens the bound)
            assert not buf.lazy
            continue
        buf.take()
        assert len(batch) == B and all(version - x.version <= eta for x in batch)
        if eta == 0:
            assert [x.index for x in batch] == list(range(version * B, (version + 1) * B))
        version += 1
        buf.advance(version)


def test_request_more_admits_one_more_batch_at_the_current_version():
    buf = StalenessBuffer(batch_groups=2, eta=0)
    assert [buf.try_start().index for _ in range(2)] == [0, 1] and buf.try_start() is None
    buf.request_more()  # dynamic sampling: another round before the step trains
    more = [buf.try_start() for _ in range(2)]
    assert [g.index for g in more] == [2, 3] and {g.version for g in more} == {0} and buf.try_start() is None
    buf.advance(1)  # the bound keeps the extra batch: the next step starts after it
    assert [buf.try_start().index for _ in range(2)] == [4, 5] and buf.try_start() is None


def test_state_dict_keeps_finished_groups_and_restarts_the_ones_in_flight():
    buf = StalenessBuffer(batch_groups=2, eta=1)
    gs = [buf.try_start() for _ in range(4)]
    for g in gs[:2]:
        buf.finish(g, [f"t{g.index}"])
    buf.take()
    buf.advance(1)
    buf.finish(gs[3], ["t3"])  # g2 still in flight
    state = buf.state_dict()
    back = StalenessBuffer(batch_groups=2, eta=1, start_step=1, version=1)
    back.load_state_dict(state)
    again = back.try_start()
    assert (again.index, again.version) == (2, 1)  # restarted first, at the restored version
    assert [back.try_start().index for _ in range(2)] == [4, 5] and back.try_start() is None  # (1 + 1 + 1) x 2
    back.finish(again, ["t2"])
    assert [(g.index, g.trajs) for g in back.take()] == [(2, ["t2"]), (3, ["t3"])]


def test_staleness_metrics_by_hand():
    def traj(versions):
        return Trajectory("s", "g", [0] * (1 + len(versions)), [False] + [True] * len(versions),
                          [0.0] * (1 + len(versions)), [-1] + versions)

    m = staleness_metrics([traj([3, 3]), traj([1, 2, 3]), traj([2])], version=3, eta=2)
    assert m["staleness/mean"] == pytest.approx((0 + 2 + 1) / 3) and m["staleness/max"] == 2
    assert (m["staleness/frac_0"], m["staleness/frac_1"], m["staleness/frac_2"]) == pytest.approx((1 / 3,) * 3)
    assert m["staleness/mixed_frac"] == pytest.approx(1 / 3)
