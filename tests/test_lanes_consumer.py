"""Pausing the bulk topic at the agent's consumer (``streams.app.CommittingConsumer.pause_topics``): why a pause
waits for the next fetch, pinned on faust-streaming 0.15.3's own ``Consumer.getmany`` (not started; no broker is
contacted; the fetch is handed in)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping

from faust.types import TP

from streams.app import CommittingConsumer, create_app
from streams.settings import Settings

INTERACTIVE, BULK = TP("p.data.requests", 0), TP("p.data.bulk", 0)


def _consumer() -> CommittingConsumer:
    consumer = create_app(Settings(topic_prefix=f"ln{uuid.uuid4().hex[:6]}"), "data").consumer
    assert isinstance(consumer, CommittingConsumer)
    consumer.assignment = lambda: {INTERACTIVE, BULK}  # type: ignore[method-assign]
    consumer._set_active_tps({INTERACTIVE, BULK})
    consumer.highwater = lambda tp: 0  # type: ignore[method-assign]
    consumer._to_message = lambda tp, record: record  # type: ignore[assignment,method-assign]
    return consumer


def _hand_in(consumer: CommittingConsumer, records: Mapping[TP, list[int]]) -> None:
    """The next fetch returns ``records`` (offsets), as aiokafka had already returned them (positions moved)."""

    async def wait_next_records(timeout: float) -> tuple[Mapping[TP, list[int]], set[TP]]:  # noqa: ASYNC109
        return records, consumer._get_active_partitions()

    consumer._wait_next_records = wait_next_records  # type: ignore[assignment,method-assign]


async def _drain(consumer: CommittingConsumer, pause: object) -> list[tuple[TP, int]]:
    out: list[tuple[TP, int]] = []
    async for tp, offset in consumer.getmany(timeout=0.1):
        out.append((tp, offset))  # type: ignore[arg-type]
        if tp == BULK and len([t for t, _ in out if t == BULK]) == 1:
            pause()  # type: ignore[operator]
    return out


async def test_faust_pause_partitions_mid_fetch_skips_the_rest_of_the_fetch_in_hand() -> None:
    """The hazard: those records were already returned by aiokafka; skipped, the partition's next record looks
    like a gap, which Faust counts as acknowledged (a commit past events never served)."""
    consumer = _consumer()
    _hand_in(consumer, {BULK: [0, 1, 2], INTERACTIVE: [0, 1]})
    out = await _drain(consumer, lambda: consumer.pause_partitions({BULK}))
    assert [offset for tp, offset in out if tp == BULK] == [0]  # 1 and 2 are gone
    assert [offset for tp, offset in out if tp == INTERACTIVE] == [0, 1]


async def test_pause_topics_mid_fetch_hands_out_the_whole_fetch_and_pauses_before_the_next() -> None:
    consumer = _consumer()
    _hand_in(consumer, {BULK: [0, 1, 2], INTERACTIVE: [0, 1]})
    out = await _drain(consumer, lambda: consumer.pause_topics([BULK.topic]))
    assert [offset for tp, offset in out if tp == BULK] == [0, 1, 2]
    assert BULK in consumer._get_active_partitions()  # nothing changed while the fetch was in hand
    consumer._apply_pauses()  # what _drain_messages does before each fetch
    assert consumer._get_active_partitions() == {INTERACTIVE} and consumer.topics_paused == {BULK.topic}


async def test_a_paused_topic_stays_paused_across_fausts_buffer_hand_back_and_resumes_at_once() -> None:
    consumer = _consumer()
    consumer.pause_topics([BULK.topic])
    consumer._apply_pauses()
    consumer.on_buffer_full(BULK)
    consumer.on_buffer_drop(BULK)  # Faust's stream buffer drained: it puts the partition back
    assert BULK in consumer._get_active_partitions()
    consumer._apply_pauses()
    assert BULK not in consumer._get_active_partitions()
    consumer.resume_topics([BULK.topic])
    assert consumer._get_active_partitions() == {INTERACTIVE, BULK} and not consumer.topics_paused
    assert not consumer._paused_partitions
    consumer._apply_pauses()
    assert consumer._get_active_partitions() == {INTERACTIVE, BULK}
