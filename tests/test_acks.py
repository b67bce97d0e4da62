"""``agents.loops.acks.AckTracker``: the one place that decides what may be acknowledged. Pure units."""

from __future__ import annotations

from dataclasses import dataclass

from agents.loops.acks import AckTracker


@dataclass(eq=False)
class Ev:
    lane: int
    offset: int


def tracker() -> tuple[AckTracker[Ev], list[tuple[int, int]]]:
    acked: list[tuple[int, int]] = []
    t: AckTracker[Ev] = AckTracker(lambda e: e.lane, lambda e: acked.append((e.lane, e.offset)))
    return t, acked


def events(lane: int, n: int, start: int = 0) -> list[Ev]:
    return [Ev(lane, start + i) for i in range(n)]


def test_out_of_order_settles_are_acknowledged_in_order_once_the_prefix_is_settled() -> None:
    t, acked = tracker()
    t.assign({0})
    e = events(0, 4)
    assert all(t.track(x) for x in e)
    assert t.settle([e[2]]) == [] and t.settle([e[1]]) == []  # e0 still runs: nothing may be acknowledged
    assert acked == []
    assert t.settle([e[0]]) == [e[0], e[1], e[2]]
    assert acked == [(0, 0), (0, 1), (0, 2)]
    assert t.held() == 1
    assert t.settle([e[3]]) == [e[3]]
    assert t.held() == 0 and t.acked == 4


def test_partitions_are_independent() -> None:
    t, acked = tracker()
    t.assign({0, 1})
    a, b = events(0, 2), events(1, 2)
    for x in (a[0], b[0], a[1], b[1]):
        t.track(x)
    assert t.settle([a[1], b[0], b[1]]) == [b[0], b[1]]  # partition 1 goes on; partition 0 waits for a0
    assert t.held({0}) == 2 and t.held({1}) == 0
    assert t.settle([a[0]]) == [a[0], a[1]]
    assert acked == [(1, 0), (1, 1), (0, 0), (0, 1)]


def test_revoke_forgets_a_partition_and_its_late_settles_ack_nothing() -> None:
    t, acked = tracker()
    t.assign({0, 1})
    a, b = events(0, 2), events(1, 2)
    for x in a + b:
        t.track(x)
    assert t.revoke({1}) == 2
    assert not t.assigned(1) and t.assigned(0)
    assert t.settle(b) == []  # revoked: never acknowledged here (the new owner answers them)
    assert not t.track(Ev(1, 2))  # a stale event fetched before the revoke is refused
    assert t.settle(a) == a
    assert acked == [(0, 0), (0, 1)]


def test_reassignment_starts_afresh_and_old_events_stay_forgotten() -> None:
    t, acked = tracker()
    t.assign({0})
    old = events(0, 2)
    for x in old:
        t.track(x)
    t.revoke({0})
    t.assign({0})  # the same partition comes back: fetched again from the committed offset
    new = events(0, 2)  # new event objects for the same offsets
    for x in new:
        assert t.track(x)
    assert t.settle(old) == []  # the old objects finishing late acknowledge nothing
    assert t.settle([new[1]]) == []  # and hold nothing back either
    assert t.settle([new[0]]) == new
    assert acked == [(0, 0), (0, 1)]


def test_duplicates_and_untracked_events_release_nothing() -> None:
    t, acked = tracker()
    t.assign({0})
    e = events(0, 2)
    for x in e:
        t.track(x)
    assert t.settle([e[0]]) == [e[0]]
    assert t.settle([e[0]]) == []  # settled again: nothing more
    assert t.settle([Ev(0, 1)]) == []  # equal offset, another object: never tracked
    assert t.settle([e[1], e[1]]) == [e[1]]
    assert acked == [(0, 0), (0, 1)]


def test_an_unassigned_partition_is_never_tracked_nor_acknowledged() -> None:
    t, acked = tracker()
    assert not t.track(Ev(3, 0))
    assert t.settle([Ev(3, 0)]) == [] and acked == [] and t.held() == 0
