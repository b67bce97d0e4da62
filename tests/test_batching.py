"""Natural micro-batching (streams.batching.BatchBuffer): pure, an injected clock, no Kafka."""

from __future__ import annotations

import asyncio

import pytest

from streams.batching import BatchBuffer, BufferClosed


class Clock:
    """A monotonic clock moved by hand; ``sleep`` advances it and yields to the loop."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_a_lone_event_is_taken_at_once() -> None:
    buf: BatchBuffer[int] = BatchBuffer(8)
    await buf.put(1)
    assert await asyncio.wait_for(buf.take(), 0.5) == [1]


async def test_take_returns_what_has_arrived_up_to_the_cap_without_waiting() -> None:
    buf: BatchBuffer[int] = BatchBuffer(4, capacity=10)
    for i in range(6):
        await buf.put(i)
    assert await buf.take() == [0, 1, 2, 3]
    assert await buf.take() == [4, 5]


async def test_take_waits_only_while_empty() -> None:
    buf: BatchBuffer[int] = BatchBuffer(4)
    taker = asyncio.create_task(buf.take())
    await asyncio.sleep(0.01)
    assert not taker.done()
    await buf.put(7)
    assert await asyncio.wait_for(taker, 0.5) == [7]


async def test_max_wait_zero_never_waits_for_a_full_batch() -> None:
    buf: BatchBuffer[int] = BatchBuffer(100, linger_s=0.0)
    await buf.put(1)
    await buf.put(2)
    assert await asyncio.wait_for(buf.take(), 0.5) == [1, 2]


async def test_linger_collects_more_and_is_measured_from_the_first_arrival() -> None:
    clock = Clock()
    buf: BatchBuffer[int] = BatchBuffer(3, linger_s=5.0, clock=clock)
    await buf.put(1)
    taker = asyncio.create_task(buf.take())
    await asyncio.sleep(0.01)
    assert not taker.done()  # lingering for more
    await buf.put(2)
    await buf.put(3)  # full: no more lingering
    assert await asyncio.wait_for(taker, 0.5) == [1, 2, 3]

    await buf.put(4)
    clock.now += 10.0  # the linger (from item 4's arrival) is over
    assert await asyncio.wait_for(buf.take(), 0.5) == [4]


async def test_linger_never_outlives_the_nearest_deadline() -> None:
    clock = Clock()
    deadlines = {1: clock.now + 0.0, 2: None}
    buf: BatchBuffer[int] = BatchBuffer(10, linger_s=60.0, deadline_of=deadlines.get, clock=clock)
    await buf.put(1)  # its deadline is now: lingering would make it late
    assert await asyncio.wait_for(buf.take(), 0.5) == [1]


async def test_put_blocks_at_capacity_until_a_take() -> None:
    buf: BatchBuffer[int] = BatchBuffer(2, capacity=2)
    await buf.put(1)
    await buf.put(2)
    putter = asyncio.create_task(buf.put(3))
    await asyncio.sleep(0.01)
    assert not putter.done() and len(buf) == 2
    assert await buf.take() == [1, 2]
    await asyncio.wait_for(putter, 0.5)
    assert await buf.take() == [3]


async def test_drop_removes_waiting_items_of_revoked_partitions() -> None:
    buf: BatchBuffer[tuple[int, int]] = BatchBuffer(10)
    for item in [(0, 1), (1, 1), (0, 2), (2, 1)]:
        await buf.put(item)
    dropped = buf.drop(lambda item: item[0] == 0)
    assert dropped == [(0, 1), (0, 2)]
    assert await buf.take() == [(1, 1), (2, 1)]


async def test_close_drains_then_ends_and_refuses_puts() -> None:
    buf: BatchBuffer[int] = BatchBuffer(10)
    await buf.put(1)
    buf.close()
    with pytest.raises(BufferClosed):
        await buf.put(2)
    assert await buf.take() == [1]
    assert await buf.take() == []


async def test_close_wakes_a_waiting_taker_and_a_blocked_putter() -> None:
    buf: BatchBuffer[int] = BatchBuffer(1, capacity=1)
    await buf.put(1)
    putter = asyncio.create_task(buf.put(2))
    await asyncio.sleep(0.01)
    buf.close()
    with pytest.raises(BufferClosed):
        await asyncio.wait_for(putter, 0.5)
    assert await buf.take() == [1]
    taker = asyncio.create_task(buf.take())
    assert await asyncio.wait_for(taker, 0.5) == []


async def test_fair_take_serves_the_oldest_across_partitions_each_in_its_own_order() -> None:
    # (partition, age) pairs; the consumer handed partition 0 over in one large chunk first.
    buf: BatchBuffer[tuple[int, float]] = BatchBuffer(
        4, capacity=20, lane_of=lambda item: item[0], age_of=lambda item: item[1]
    )
    for item in [(0, 5.0), (0, 6.0), (0, 7.0), (0, 8.0), (1, 1.0), (1, 2.0), (2, 3.0), (2, 9.0)]:
        await buf.put(item)
    assert await buf.take() == [(1, 1.0), (1, 2.0), (2, 3.0), (0, 5.0)]
    assert await buf.take() == [(0, 6.0), (0, 7.0), (0, 8.0), (2, 9.0)]


async def test_fair_take_never_reorders_one_partition_even_when_its_ages_go_backwards() -> None:
    buf: BatchBuffer[tuple[int, float, str]] = BatchBuffer(
        2, capacity=20, lane_of=lambda item: item[0], age_of=lambda item: item[1]
    )
    for item in [(0, 5.0, "a"), (0, 1.0, "b"), (1, 3.0, "c")]:
        await buf.put(item)
    assert [i[2] for i in await buf.take()] == ["c", "a"]  # "b" is older, but it must not overtake "a"
    assert [i[2] for i in await buf.take()] == ["b"]


async def test_a_batch_stops_before_its_cost_would_pass_the_budget_but_takes_one_item_at_least() -> None:
    buf: BatchBuffer[int] = BatchBuffer(8, capacity=20, cost_of=float, max_cost=10.0)
    for cost in [4, 5, 2, 30, 1]:
        await buf.put(cost)
    assert await buf.take() == [4, 5]  # + 2 would make 11
    assert await buf.take() == [2]
    assert await buf.take() == [30]  # alone over the budget: taken anyway, alone
    assert await buf.take() == [1]


def test_lane_and_cost_settings_come_in_pairs() -> None:
    with pytest.raises(ValueError):
        BatchBuffer(4, lane_of=lambda item: item)
    with pytest.raises(ValueError):
        BatchBuffer(4, max_cost=3.0)
