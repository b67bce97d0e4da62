"""A table kept from a compacted, single-partition topic: every process reads it from the start and tails it.

``CompactedTable`` is how several edges share durable state without a database: the Batch API's files and
batches (``schemas.batch``). It guarantees:

* after ``start`` returns, the table holds every record the topic had when it started (read from offset 0;
  ``start`` waits for that, bounded by ``timeout_s``, then raises ``TimeoutError``);
* ``put`` returns once the broker acknowledged the record (``acks=all`` on the edge's producer), and the
  writer's own table shows it at once (read-your-writes); other processes see it when their tail reaches
  it (milliseconds), and ``sync`` waits until this process has read up to the topic's current end, so a
  lookup that misses can ask again after ``sync`` before it answers 404;
* per key, a record never replaces a later one: the one partition orders all writes, and the table keeps
  the offset of each key's latest record (a tombstone included), so a record read late by the tail cannot
  undo a newer ``put`` already applied;
* values are kept in memory only for keys ``keep_value(key)`` accepts; for the others only their offset is
  kept, and ``read`` fetches the bytes on demand with a reader of its own (file chunks: the table of a
  100 MB file costs a few hundred offsets, not 100 MB).

What can go wrong: Kafka away. ``put`` then raises (``KafkaError``/``TimeoutError`` after the producer's own
timeout) and nothing is applied; the tail reconnects by itself and resumes from its position. A record
compacted away leaves no offset behind, so ``read`` only ever asks for offsets of latest records, which
compaction keeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from streams.kafka_security import client_options
from streams.settings import Settings

log = logging.getLogger(__name__)

POLL_MS = 200
MAX_BACKOFF_S = 2.0


class CompactedTable:
    """One compacted single-partition topic as a key -> value table (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        topic: str,
        producer: AIOKafkaProducer,
        keep_value: Callable[[str], bool] = lambda key: True,
    ) -> None:
        self.settings = settings
        self.topic = topic
        self.tp = TopicPartition(topic, 0)
        self.producer = producer
        self.keep_value = keep_value
        self.values: dict[str, bytes] = {}
        self.offsets: dict[str, int] = {}  # key -> offset of its latest record (present keys only)
        self._latest: dict[str, int] = {}  # key -> offset of its latest record, tombstones included
        self.position = 0  # the next offset the tail will read
        self._moved = asyncio.Condition()
        self._consumer: AIOKafkaConsumer | None = None
        self._reader: AIOKafkaConsumer | None = None
        self._read_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def _new_consumer(self) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=POLL_MS,
            **client_options(self.settings),
        )

    async def start(self, timeout_s: float = 30.0) -> None:
        """Assign the partition, read it from the start up to its current end (``TimeoutError`` past
        ``timeout_s``), then tail it in a task."""
        self._consumer = self._new_consumer()
        await self._consumer.start()
        self._consumer.assign([self.tp])
        await self._consumer.seek_to_beginning(self.tp)
        self._task = asyncio.create_task(self._tail(), name=f"table-{self.topic}")
        await self.sync(timeout_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for consumer in (self._consumer, self._reader):
            if consumer is not None:
                await consumer.stop()

    async def _tail(self) -> None:
        assert self._consumer is not None
        backoff = 0.1
        while True:
            try:
                fetched = await self._consumer.getmany(self.tp, timeout_ms=POLL_MS)
                for record in fetched.get(self.tp, []):
                    key = record.key.decode() if record.key is not None else ""
                    self._apply(key, record.value, record.offset)
                position = await self._consumer.position(self.tp)
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001  (policy: the tail outlives any fetch error; it resumes)
                log.warning("table %s: fetch failed (%r); retrying in %.1f s", self.topic, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            async with self._moved:
                self.position = max(self.position, position)
                self._moved.notify_all()

    def _apply(self, key: str, value: bytes | None, offset: int) -> None:
        if offset < self._latest.get(key, -1):
            return
        self._latest[key] = offset
        if value is None:
            self.values.pop(key, None)
            self.offsets.pop(key, None)
            return
        self.offsets[key] = offset
        if self.keep_value(key):
            self.values[key] = value

    async def sync(self, timeout_s: float = 5.0) -> None:
        """Wait until the tail has read everything the topic holds now (``TimeoutError`` past ``timeout_s``)."""
        assert self._consumer is not None
        async with asyncio.timeout(timeout_s):
            end = (await self._consumer.end_offsets([self.tp]))[self.tp]
            async with self._moved:
                await self._moved.wait_for(lambda: self.position >= end)

    async def put(self, key: str, value: bytes | None) -> None:
        """Write ``key`` (``None``: a tombstone) and apply it here once the broker has it."""
        metadata = await self.producer.send_and_wait(self.topic, value, key=key.encode())
        self._apply(key, value, metadata.offset)

    async def put_many(self, items: Iterable[tuple[str, bytes | None]]) -> None:
        """``put`` for several records at once (sent together, each applied once acknowledged)."""
        pending = [(key, value, await self.producer.send(self.topic, value, key=key.encode())) for key, value in items]
        for key, value, future in pending:
            metadata = await future
            self._apply(key, value, metadata.offset)

    def get(self, key: str) -> bytes | None:
        return self.values.get(key)

    async def read(self, offsets: list[int], timeout_s: float = 30.0) -> dict[int, bytes]:
        """The values at ``offsets`` (records of keys whose values are not kept), read from the broker.

        Raises:
            TimeoutError: not all were read within ``timeout_s``; KafkaError: the broker refused.
        """
        wanted = set(offsets)
        found: dict[int, bytes] = {}
        if not wanted:
            return found
        async with self._read_lock, asyncio.timeout(timeout_s):
            if self._reader is None:
                self._reader = self._new_consumer()
                await self._reader.start()
                self._reader.assign([self.tp])
            self._reader.seek(self.tp, min(wanted))
            last = max(wanted)
            while len(found) < len(wanted):
                fetched = await self._reader.getmany(self.tp, timeout_ms=POLL_MS)
                for record in fetched.get(self.tp, []):
                    if record.offset in wanted and record.value is not None:
                        found[record.offset] = record.value
                if await self._reader.position(self.tp) > last and len(found) < len(wanted):
                    raise KafkaError(f"{self.topic}: offsets {sorted(wanted - set(found))[:5]} hold no value")
        return found
