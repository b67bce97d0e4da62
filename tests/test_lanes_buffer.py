"""Priority lanes in the micro-batch buffer (streams.batching.BatchBuffer with a BulkLane): pure, no Kafka.

Items are ``(lane, n)`` tuples: ``("i", n)`` interactive, ``("b", n)`` bulk.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from streams.batching import BatchBuffer, BulkLane

Item = tuple[str, int]


def is_bulk(item: Item) -> bool:
    return item[0] == "b"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def lanes_buffer(
    max_batch: int, share: float = 0.0, fill: int = 1000, clock: Clock | None = None, **lane: object
) -> tuple[BatchBuffer[Item], list[bool]]:
    """``fill``: bulk beyond its credit while interactive is live (large: bulk fills every slot left)."""
    gates: list[bool] = []
    bulk = BulkLane(is_bulk, min_share=share, fill_while_interactive=fill, gate=gates.append, **lane)  # type: ignore[arg-type]
    return BatchBuffer(max_batch, capacity=1000, bulk=bulk, clock=clock or Clock()), gates


async def put_all(buf: BatchBuffer[Item], items: list[Item]) -> None:
    for item in items:
        assert await asyncio.wait_for(buf.put(item), 1.0)


async def test_interactive_items_are_taken_before_bulk_items_that_arrived_earlier() -> None:
    buf, _ = lanes_buffer(4)
    await put_all(buf, [("b", n) for n in range(6)] + [("i", 0), ("i", 1)])
    batch = await buf.take()
    assert batch[:2] == [("i", 0), ("i", 1)] and batch[2:] == [("b", 0), ("b", 1)]
    assert await buf.take() == [("b", 2), ("b", 3), ("b", 4), ("b", 5)]


async def test_bulk_fills_every_slot_interactive_leaves() -> None:
    buf, _ = lanes_buffer(8, share=0.1)
    await put_all(buf, [("b", n) for n in range(20)] + [("i", 0)])
    batch = await buf.take()
    assert len(batch) == 8 and batch.count(("i", 0)) == 1 and sum(map(is_bulk, batch)) == 7


async def test_while_interactive_is_live_a_batch_carries_few_bulk_items_and_full_ones_after() -> None:
    clock = Clock()
    buf, _ = lanes_buffer(8, share=0.0, fill=2, clock=clock, live_s=1.0)
    await put_all(buf, [("b", n) for n in range(40)])
    assert len(await buf.take()) == 8  # bulk alone: full batches
    await put_all(buf, [("i", 0)])
    assert await buf.take() == [("i", 0), ("b", 8), ("b", 9)]
    clock.now += 0.9  # no interactive waits, but it was seen within live_s: the batch stays short
    assert await buf.take() == [("b", 10), ("b", 11)]
    clock.now += 0.2
    assert len(await buf.take()) == 8  # interactive gone quiet: full batches again


async def test_min_share_holds_beyond_the_fill_while_interactive_is_live() -> None:
    buf, _ = lanes_buffer(10, share=0.5, fill=0)
    await put_all(buf, [("b", n) for n in range(50)])
    bulk_taken = 0
    for round_ in range(4):
        await put_all(buf, [("i", round_ * 100 + k) for k in range(10)])
        batch = await buf.take()
        bulk_taken += sum(map(is_bulk, batch))
        buf.drop(lambda item: item[0] == "i")  # a fresh full load of interactive every round
    assert bulk_taken == 20  # half of 4 batches of 10, although no bulk fill is allowed


async def test_without_a_min_share_a_steady_interactive_load_takes_every_slot() -> None:
    buf, _ = lanes_buffer(4, share=0.0)
    await put_all(buf, [("b", 0)])
    for round_ in range(5):
        await put_all(buf, [("i", round_ * 4 + k) for k in range(4)])
        assert not any(map(is_bulk, await buf.take()))


async def test_min_share_gives_bulk_its_slots_under_a_steady_interactive_load() -> None:
    buf, _ = lanes_buffer(10, share=0.2)
    await put_all(buf, [("b", n) for n in range(100)])
    bulk_taken = 0
    for round_ in range(10):
        await put_all(buf, [("i", round_ * 100 + k) for k in range(10)])  # always a full batch of interactive
        batch = await buf.take()
        assert len(batch) == 10
        bulk_taken += sum(map(is_bulk, batch))
        assert sum(map(is_bulk, batch)) >= 2  # 0.2 x 10 slots, every batch
    assert bulk_taken == 20


async def test_min_share_accumulates_over_takes_of_one_slot() -> None:
    """The continuous loop admits one row at a time: every 1/share-th take goes to bulk."""
    buf, _ = lanes_buffer(1, share=0.25)
    await put_all(buf, [("b", n) for n in range(10)])
    taken: list[Item] = []
    for round_ in range(12):
        await put_all(buf, [("i", round_)])
        taken += await buf.take()
    assert sum(map(is_bulk, taken)) == 3  # 12 takes x 0.25
    assert [n for lane, n in taken if lane == "b"] == [0, 1, 2]  # bulk in its own order


async def test_bulk_waiting_past_pause_at_closes_the_gate_and_reopens_it_at_resume_at() -> None:
    buf, gates = lanes_buffer(4, pause_at=8, resume_at=4, capacity=100)
    await put_all(buf, [("b", n) for n in range(7)])
    assert gates == [] and not buf.bulk_paused
    await put_all(buf, [("b", 7), ("i", 0)])
    assert gates == [True] and buf.bulk_paused and buf.bulk_waiting == 8
    await put_all(buf, [("b", 8), ("b", 9)])  # what the consumer had fetched still comes in: no second call
    assert gates == [True]
    await buf.take()  # 1 interactive + 3 bulk: 7 bulk left
    assert gates == [True]
    await buf.take()  # 3 left
    assert gates == [True, False] and not buf.bulk_paused


async def test_a_bulk_flood_never_blocks_an_interactive_put() -> None:
    gates: list[bool] = []
    bulk = BulkLane(is_bulk, pause_at=4, resume_at=2, capacity=6, gate=gates.append)
    buf: BatchBuffer[Item] = BatchBuffer(4, capacity=2, bulk=bulk)
    await put_all(buf, [("b", n) for n in range(6)])
    blocked = asyncio.create_task(buf.put(("b", 6)))
    await asyncio.sleep(0.01)
    assert not blocked.done()  # bulk is at its own capacity
    await put_all(buf, [("i", 0), ("i", 1)])  # interactive has its own room
    assert (await buf.take())[:2] == [("i", 0), ("i", 1)]
    assert await asyncio.wait_for(blocked, 1.0)


async def test_dropping_bulk_items_reopens_the_gate() -> None:
    buf, gates = lanes_buffer(4, pause_at=4, resume_at=1, capacity=10)
    await put_all(buf, [("b", n) for n in range(4)])
    assert gates == [True]
    assert len(buf.drop(lambda item: item[1] < 3)) == 3
    assert gates == [True, False] and buf.bulk_waiting == 1


async def test_lanes_keep_each_partition_in_order_within_a_lane() -> None:
    bulk: BulkLane[tuple[str, int, int]] = BulkLane(lambda item: item[0] == "b", fill_while_interactive=100)
    buf: BatchBuffer[tuple[str, int, int]] = BatchBuffer(
        6, capacity=100, bulk=bulk, lane_of=lambda item: (item[0], item[1]), age_of=lambda item: float(item[2])
    )
    for item in [("b", 0, 1), ("b", 1, 0), ("i", 0, 5), ("i", 1, 3), ("i", 0, 6), ("b", 0, 2)]:
        await buf.put(item)
    assert await buf.take() == [("i", 1, 3), ("i", 0, 5), ("i", 0, 6), ("b", 1, 0), ("b", 0, 1), ("b", 0, 2)]


def test_bulk_lane_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="min_share"):
        BulkLane(is_bulk, min_share=1.5)
    with pytest.raises(ValueError, match="resume_at"):
        BulkLane(is_bulk, pause_at=4, resume_at=4)
    with pytest.raises(ValueError, match="fill_while_interactive"):
        BulkLane(is_bulk, fill_while_interactive=-1)


def test_the_lane_targets_read_the_suites_figures_and_say_why_when_missing() -> None:
    from bench.lanes import target_rows

    figures = {
        "interactive_idle_ms": {"p50": 20.0, "p99": 100.0},
        "interactive_during_ms": {"p50": 31.0, "p99": 150.0},
        "interactive_p50_ratio": 1.55,
        "interactive_p99_ratio": 1.5,
        "direct_interactive_items_per_s": 100.0,
        "bulk_alone_items_per_s": 90.0,
        "bulk_alone_vs_direct": 0.9,
    }
    rows = target_rows({"lanes": {"figures": figures}})
    assert [met for _, _, met in rows] == [False, True, True]
    assert rows[0][1] == "31.0 / 20.0 ms = 1.55x"
    assert target_rows({"lanes": {"failed": "RuntimeError: x"}}) == [
        ("priority lanes (issue #16)", "RuntimeError: x", None)
    ]


# -- bulk yields to live interactive traffic ----------------------------------------------------------------


async def _live_with_a_batch_of(buf: BatchBuffer[Item], clock: Clock, seconds: float) -> None:
    """Interactive seen by a take, then a batch of ``seconds`` (the clock moves; nothing else does)."""
    await put_all(buf, [("i", 0)])
    assert await buf.take() == [("i", 0)]
    clock.now += seconds


async def test_while_interactive_is_live_a_bulk_only_batch_waits_and_an_interactive_item_ends_the_wait() -> None:
    clock = Clock()
    buf, _ = lanes_buffer(8, fill=1, clock=clock, live_s=5.0, yield_ratio=1.0, yield_max_s=10.0)
    await _live_with_a_batch_of(buf, clock, 3.0)  # the last batch "took" 3 s: the yield may last 3 s
    await put_all(buf, [("b", 0), ("b", 1)])
    taking = asyncio.create_task(buf.take())
    await asyncio.sleep(0.05)
    assert not taking.done()  # only bulk waits and interactive is live: it yields
    await put_all(buf, [("b", 2)])
    await asyncio.sleep(0.02)
    assert not taking.done()  # more bulk does not end the wait
    await put_all(buf, [("i", 1)])
    batch = await asyncio.wait_for(taking, 1.0)  # an interactive item does, at once
    assert batch[0] == ("i", 1) and buf.yields == 1


async def test_a_yield_lasts_at_most_its_ratio_of_the_last_batch_and_never_without_live_interactive() -> None:
    clock = Clock()
    buf, _ = lanes_buffer(8, fill=1, clock=clock, live_s=5.0, yield_ratio=1.0, yield_max_s=10.0)
    await put_all(buf, [("b", 0)])
    assert await asyncio.wait_for(buf.take(), 0.5) == [("b", 0)]  # no interactive seen yet: no yield
    await _live_with_a_batch_of(buf, clock, 0.0)  # a batch that took no time: nothing to yield
    await put_all(buf, [("b", 1)])
    assert await asyncio.wait_for(buf.take(), 0.5) == [("b", 1)]
    assert buf.yields == 1  # it yielded, for 0 s
    clock.now += 10.0  # interactive last seen 10 s ago (live_s 5): bulk runs back to back
    await put_all(buf, [("b", 2)])
    assert await asyncio.wait_for(buf.take(), 0.5) == [("b", 2)] and buf.yields == 1


async def test_a_yield_is_bounded_by_yield_max_s() -> None:
    real = time.monotonic
    buf, _ = lanes_buffer(8, fill=1, clock=real, live_s=60.0, yield_ratio=10.0, yield_max_s=0.05)  # type: ignore[arg-type]
    await put_all(buf, [("i", 0)])
    assert await buf.take() == [("i", 0)]
    await asyncio.sleep(0.05)  # the "batch": 50 ms -> 500 ms at ratio 10, capped at 50 ms
    await put_all(buf, [("b", 0)])
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await asyncio.wait_for(buf.take(), 2.0) == [("b", 0)]
    waited = loop.time() - started
    assert 0.04 <= waited < 0.4 and buf.yields == 1  # generous: a shared machine
