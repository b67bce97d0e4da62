"""The Faust app factory: one app (= one consumer group) per service.

Faust is used as the agent runtime only: consumer-group membership, partition assignment, fetching and
offset commits of acknowledged events. The app has no web server, no tables and no autodiscovery; values
stay raw bytes and are decoded by our codec, so a malformed event never reaches Faust's deserialiser (which
would drop it silently).

Rebalances (``CommittingConsumer``). faust-streaming 0.15.3, on a revoke (``Consumer.on_partitions_revoked``),
first forgets the revoked partitions' acknowledged offsets (``_acked``, ``_committed_offset``) and only then
stops the flow and tells the app; it commits them nowhere (with ``stream_wait_empty=False``, and with it the
commit after ``wait_empty`` finds them already forgotten). Every rebalance thus answered again what was
acknowledged since the last periodic commit. ``CommittingConsumer`` first lets the agent loop settle what it
took of the revoked partitions (``RebalanceListener.revoking``, bounded), then commits their acknowledged
offsets, then lets Faust go on: a graceful rebalance answers nothing twice. A commit that fails there is
logged (the events are answered again, never lost).

Per-event cost (``CommittingConsumer._drain_messages``). Faust's fetch loop hands each message to the conductor
(which puts it on the agent's stream queue) under ``wait_first(callback(message), suspend_flow.wait())``: two
Tasks and an ``asyncio.wait`` per event, so that a hand-over blocked on a full queue is abandoned when a
rebalance suspends the flow. The hand-over only suspends when the flow is suspended, Faust's producer buffer is
over its bound, or a channel queue is full; when none holds (checked just before, with no await in between),
``CommittingConsumer`` awaits it directly, and uses ``wait_first`` otherwise. What is delivered, in what order,
and when the flow is abandoned do not change.

Pausing a lane (``CommittingConsumer.pause_topics``; the bulk lane, ``streams.batching.BulkLane``). Faust's own
``pause_partitions`` removes the partitions from the live set that ``Consumer.getmany`` also filters the records
of the fetch being handed out by: records aiokafka already returned (its position moved past them) of a
partition paused mid-hand-out are skipped, and the next record of that partition then looks like a gap, which
Faust counts as acknowledged (``_add_gap``): a commit past events never served. So a pause asked for is applied
only between two ``getmany`` calls of ``_drain_messages`` (nothing of a fetch is in hand then), and again before
every later one (Faust's stream-buffer hand-back ``on_buffer_drop`` may have put the partition back in the live
set). A resume is applied at once (adding to the set drops nothing) and, while a topic is paused, ``getmany``
waits at most ``PAUSED_FETCH_WAIT_S`` for records, so records of a resumed partition already fetched by aiokafka
are handed out within that instead of after a whole one-second wait. Acknowledgement and commits stay per
partition and are not touched: a paused partition's settled events are committed as before.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Hashable, Iterable, Mapping, Set
from typing import Any, Protocol, cast

import faust
from faust.tables import TableManager
from faust.transport import drivers as faust_drivers
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, Message
from mode import ServiceT

from schemas import Service
from streams.kafka_security import client_options
from streams.settings import Settings
from streams.topics import consumer_group, service_topics


class IdempotentProducer(faust_aiokafka.Producer):
    """Faust's aiokafka producer with ``enable_idempotence`` (and ``acks=all``) always on.

    faust-streaming 0.15.3 has no setting for it: ``Producer._settings_extra`` passes
    ``enable_idempotence=True`` only under ``processing_guarantee="exactly_once"`` (transactions, which we
    do not use). Without it a send retried across a leader change may write a reply twice.
    """

    def _settings_extra(self) -> Mapping[str, Any]:
        return {**super()._settings_extra(), "acks": "all", "enable_idempotence": True}


class RebalanceListener(Protocol):
    """The agent loop's side of a rebalance (``agents.loops.base.LoopBase``)."""

    def on_assigned(self, assigned: Iterable[Hashable]) -> None:
        """Partitions assigned to this consumer (before Faust resumes fetching them)."""

    async def revoking(self, revoked: Iterable[Hashable]) -> None:
        """Partitions about to be revoked: return once what may be committed of them is acknowledged."""

    def committed(self, offsets: Mapping[Hashable, int]) -> None:
        """Offsets the broker took as committed (per partition, the next offset to read)."""

    def forget(self, revoked: Iterable[Hashable]) -> None:
        """Partitions revoked, after their acknowledged offsets were committed (or the commit failed)."""


PAUSED_FETCH_WAIT_S = 0.05


class CommittingConsumer(faust_aiokafka.Consumer):
    """Faust's aiokafka consumer that commits acknowledged offsets of revoked partitions before Faust forgets
    them (see the module docstring); ``listener`` is told of assignments and revokes first; whole topics can be
    paused and resumed safely (``pause_topics``)."""

    listener: RebalanceListener | None = None
    _topics_paused: frozenset[str] = frozenset()

    def pause_topics(self, topics: Iterable[str]) -> None:
        """Stop handing out (and so fetching past one fetch of) ``topics``' partitions, from the next fetch on."""
        self._topics_paused = self._topics_paused | set(topics)

    def resume_topics(self, topics: Iterable[str]) -> None:
        """Hand out ``topics``' partitions again, now."""
        names = set(topics)
        self._topics_paused = self._topics_paused - names
        tps = {tp for tp in self._paused_partitions if tp.topic in names}
        if tps:
            self.resume_partitions(tps)

    @property
    def topics_paused(self) -> frozenset[str]:
        return self._topics_paused

    def _apply_pauses(self) -> None:
        """Between two fetches: pause the assigned partitions of the paused topics (module docstring)."""
        if self._topics_paused:
            tps = {tp for tp in self.assignment() if tp.topic in self._topics_paused}
            if tps:
                self.pause_partitions(tps)

    async def on_partitions_revoked(self, revoked: Set[TP]) -> None:
        if revoked:
            if self.listener is not None:
                try:
                    await self.listener.revoking(set(revoked))
                except Exception:
                    log.exception("the agent loop failed to settle revoked partitions")
            await self.commit_acked(revoked)
            if self.listener is not None:
                self.listener.forget(set(revoked))
        await super().on_partitions_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Set[TP], generation_id: int = 0) -> None:
        if self.listener is not None:
            self.listener.on_assigned(set(assigned))
        await super().on_partitions_assigned(set(assigned), generation_id)

    async def _commit_offsets(self, offsets: Mapping[TP, int], start_new_transaction: bool = True) -> bool:
        """Faust's commit (periodic, on revoke, on stop); the listener hears what the broker took."""
        assignment = self.assignment()
        committable: dict[Hashable, int] = {tp: offset for tp, offset in offsets.items() if tp in assignment}
        did_commit = bool(await super()._commit_offsets(offsets, start_new_transaction))
        if did_commit and committable and self.listener is not None:
            try:
                self.listener.committed(committable)
            except Exception:
                log.exception("the agent loop failed to take committed offsets")
        return did_commit

    def _delivers_at_once(self, tp: TP) -> bool:
        """Whether handing a message of ``tp`` to the conductor completes without suspending: the flow is active,
        Faust's producer buffer is below its bound and every channel queue of ``tp`` has room (see the module
        docstring)."""
        app = self.app
        if self.suspend_flow.is_set() or not app.flow_control.is_active():
            return False
        buffer = app.producer.buffer
        if buffer.size > buffer.max_messages:
            return False
        channels = app.topics._tp_index.get(tp)  # type: ignore[attr-defined]
        return bool(channels) and not any(channel.queue.full() for channel in channels)

    async def _drain_messages(self, fetcher: ServiceT) -> None:  # pragma: no cover  (Faust's loop, one change)
        """faust-streaming 0.15.3's ``Consumer._drain_messages``, except that a message is handed to the
        conductor by a plain ``await`` when that cannot suspend (``_delivers_at_once``), instead of
        ``wait_first(callback(message), suspend_flow.wait())`` for every message (two Tasks and an
        ``asyncio.wait`` per event: the largest share of the agent's per-event cost in Faust). Otherwise, as
        Faust does, the hand-over is abandoned if the flow is suspended (a rebalance) while it waits."""
        callback = self.callback
        getmany = self.getmany
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set  # type: ignore[attr-defined]
        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        set_flag, unset_flag = self.diag.set_flag, self.diag.unset_flag
        commit_every = self._commit_every
        acks_enabled_for = self.app.topics.acks_enabled_for
        delivers_at_once = self._delivers_at_once
        yield_every = 100
        num_since_yield = 0
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                set_flag(CONSUMER_FETCHING)
                self._apply_pauses()
                wait_s = PAUSED_FETCH_WAIT_S if self._topics_paused else 1.0
                ait = cast(AsyncIterator[tuple[TP, Message]], getmany(timeout=wait_s))
                await self.sleep(0)
                if not self.should_stop:
                    async for tp, message in ait:
                        num_since_yield += 1
                        if num_since_yield > yield_every:
                            await asyncio.sleep(0)
                            num_since_yield = 0
                        offset = message.offset
                        r_offset = get_read_offset(tp)
                        if r_offset is None or offset >= r_offset:
                            gap = offset - (r_offset or 0)
                            if gap > 1 and r_offset and acks_enabled_for(message.topic):
                                await self._add_gap(tp, r_offset + 1, offset)
                            if commit_every is not None and self._n_acked >= commit_every:
                                self._n_acked = 0
                                await self.commit()
                            if delivers_at_once(tp):
                                await callback(message)
                            else:
                                await self.wait_first(callback(message), self.suspend_flow.wait())
                            set_read_offset(tp, offset)
                    unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception:
            log.exception("Drain messages raised")
            raise
        finally:
            unset_flag(CONSUMER_FETCHING)

    async def commit_acked(self, tps: Set[TP]) -> bool:
        """Commit the acknowledged offsets of ``tps`` now (after any commit already running). Never raises."""
        try:
            await self.maybe_wait_for_commit_to_finish()
            committed = await self.commit(set(tps))
        except Exception as exc:  # noqa: BLE001  (not committed: answered again by the next owner, never lost)
            log.warning("could not commit acknowledged offsets of revoked partitions: %r", exc)
            return False
        log.info("rebalance: acknowledged offsets of %d revoked partitions committed (new offsets: %s)", len(tps),
                 bool(committed))  # fmt: skip
        return bool(committed)


class TablelessManager(TableManager):
    """Faust's table manager without its fixed one-second sleep at start.

    faust-streaming 0.15.3's ``TableManager.on_start`` sleeps 1 s before it finalises the tables' channels and
    starts recovery; the consumer subscribes only after that, so every agent start waited a second for nothing.
    Our apps declare no tables (values stay raw bytes; nothing is kept in Faust), so the wait guards nothing.
    """

    async def on_start(self) -> None:
        if self.values():
            await super().on_start()  # someone declared a table after all: Faust's own start, sleep included
            return
        if not self.should_stop:
            await self._update_channels()
            await self.recovery.start()


class IdempotentTransport(faust_aiokafka.Transport):
    """Faust's aiokafka transport, producing through :class:`IdempotentProducer` and consuming through
    :class:`CommittingConsumer`."""

    Producer = IdempotentProducer
    Consumer = CommittingConsumer


faust_drivers.TRANSPORTS.aliases.setdefault("aisemble", f"{__name__}:IdempotentTransport")

log = logging.getLogger(__name__)


def listen_rebalance(app: faust.App, listener: RebalanceListener) -> None:
    """Tell ``listener`` of ``app``'s partition assignments and revokes (see ``CommittingConsumer``).

    Raises:
        TypeError: the app does not consume through ``CommittingConsumer`` (its broker URL is not ``aisemble://``).
    """
    consumer = app.consumer
    if not isinstance(consumer, CommittingConsumer):
        raise TypeError(f"{type(consumer).__name__} is not a CommittingConsumer: use broker_urls()")
    consumer.listener = listener


def broker_urls(bootstrap: str) -> list[str]:
    """Faust's broker URLs from a Kafka bootstrap list (``h1:9092,h2:9092``); the ``aisemble://`` scheme
    selects :class:`IdempotentTransport` (Faust's aiokafka driver with an idempotent producer)."""
    return [f"aisemble://{host.strip()}" for host in bootstrap.split(",") if host.strip()]


def faust_credentials(settings: Settings) -> faust.types.auth.CredentialsT | None:
    """Faust's ``broker_credentials`` for ``settings``' Kafka security (None for PLAINTEXT).

    Built from ``streams.kafka_security.client_options``, so the agents validate and connect exactly as the
    edge does: ``SASLCredentials`` (PLAIN or SCRAM; with the SSL context it is SASL_SSL, which faust-streaming
    0.15.3's ``credentials_to_aiokafka_auth`` passes to aiokafka as is) or ``SSLCredentials``. Faust gives them
    to every client it makes: the group consumer, the producer and topic creation through it.

    Raises:
        KafkaSecurityConfigError: the settings cannot work together.
    """
    options = client_options(settings)
    protocol = options["security_protocol"]
    if protocol == "PLAINTEXT":
        return None
    if protocol == "SSL":
        return faust.SSLCredentials(options["ssl_context"])
    return faust.SASLCredentials(
        username=options["sasl_plain_username"],
        password=options["sasl_plain_password"],
        mechanism=options["sasl_mechanism"],
        ssl_context=options.get("ssl_context"),  # present: SASL_SSL; absent: SASL_PLAINTEXT
    )


def stream_buffer_events(settings: Settings, service: Service) -> int:
    """Faust's ``stream_buffer_maxsize`` for ``service``: events fetched and waiting for the agent's loop.

    Faust's default (4,096 events) sits upstream of the loop's own bounded buffer: for vision (events of up to
    ``max_event_bytes``) that was gigabytes under a backlog. One batch's worth is enough to keep the loop fed:
    ``max_batch`` events, and with ``max_batch_bytes`` no more events than that many bytes can hold at the
    largest event size (at least one).
    """
    conf = settings.service(service)
    events = conf.max_batch
    if conf.max_batch_bytes:
        events = min(events, max(1, conf.max_batch_bytes // settings.max_event_bytes))
    return max(1, events)


POLL_BATCHES = 8  # one fetch hands out at most this many batches' worth of records (poll_records)


def poll_records(settings: Settings, service: Service) -> int:
    """Faust's ``broker_max_poll_records`` for ``service``: the most records one fetch hands out.

    Unbounded (Faust's default) a fetch of a backlog hands out all aiokafka holds (a megabyte per partition:
    thousands of small events), and a paused topic stops only after the fetch in hand is handed out
    (``CommittingConsumer.pause_topics``): every bulk event of it would sit between the broker and the loop,
    ahead of any interactive event of the next fetch. ``POLL_BATCHES`` batches' worth bounds that.
    """
    return POLL_BATCHES * stream_buffer_events(settings, service)


def create_app(settings: Settings, service: Service) -> faust.App:
    """A Faust app for one service's agents (its stream buffer sized by ``stream_buffer_events``, a fetch bounded
    by ``poll_records``)."""
    datadir = settings.cache_dir / "faust" / f"{settings.topic_prefix}-{service}"
    datadir.parent.mkdir(parents=True, exist_ok=True)
    return faust.App(
        consumer_group(settings.topic_prefix, service),
        broker=broker_urls(settings.kafka_bootstrap),
        broker_credentials=faust_credentials(settings),
        web_enabled=False,
        autodiscover=False,
        store="memory://",
        TableManager=TablelessManager,
        datadir=str(datadir),
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        topic_allow_declare=True,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=settings.session_timeout_s / 3,
        broker_commit_every=1000,
        producer_acks=-1,
        producer_max_request_size=settings.max_event_bytes,
        # No linger: a reply leaves at once at low load. Batching at high load does not need it: aiokafka keeps one
        # produce request in flight per broker, and what is sent meanwhile waits and leaves together in the next.
        producer_linger_ms=0,
        # The producer gives up on a send after this (Faust's default is 20 minutes): with the agent's own
        # bounded retry (agents.loop) it keeps a dead broker from holding a batch, or a shutdown, for long.
        producer_request_timeout=settings.delivery_retry_s,
        stream_wait_empty=False,
        stream_buffer_maxsize=stream_buffer_events(settings, service),
        broker_max_poll_records=poll_records(settings, service),
        logging_config=None,
    )


def request_topic(app: faust.App, settings: Settings, service: Service) -> faust.TopicT:
    """The service's request topics, read as raw bytes: the interactive one, and the bulk one unless the
    service's ``bulk_lane`` is off (one stream: the agent's loop tells them apart by topic)."""
    topics = service_topics(settings.topic_prefix, service)
    names = [topics.requests, topics.bulk] if settings.service(service).bulk_lane else [topics.requests]
    return app.topic(
        *names,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.partitions,
    )
