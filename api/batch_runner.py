"""Who runs a batch, and how: one runner per batch at a time, over Kafka, surviving any edge's death.

Design (the records and topics are in ``schemas.batch``):

* **State lives in Kafka, Redis plays no part.** Files and batch states are compacted topics every edge reads
  whole at boot and tails (``streams.ktable``), so any edge answers for any batch, and a batch survives
  every edge (SIGKILL, restart, another edge taking the next call) and any Redis outage.
* **Exactly one runner at a time.** Creating a batch writes its state (``validating``) and then one
  ``BatchJob`` to ``{prefix}.batch-jobs``, consumed by the group ``{prefix}-batch-runners`` that every edge
  with ``batch.runner`` joins. The edge that owns the job's partition runs it; the job's offset is committed
  only once the batch is terminal (each partition commits up to its earliest unfinished job). An edge that
  dies (SIGKILL) leaves the group after ``session_timeout_s``; the partition moves to another edge, or to the
  same one restarted, which reads the job again and resumes. A partition revoked in a rebalance stops its
  runners first (cancelled, nothing half-written is visible: files appear only whole, ``streams.files``).
* **Resuming loses and repeats nothing.** Line ``n`` is produced as ``RequestEvent`` id ``{batch_id}-{n}``
  to the service's bulk lane (``{prefix}.{service}.bulk``: the agents' same micro-batches, dedup and
  cache, with the capacity interactive traffic leaves), replying to the batch's own topic
  ``{prefix}.replies.{batch_id}``. A resumed runner reads that topic from the start: every line answered
  before the crash is known and never produced again; lines in flight at the crash are produced again
  under the same id. Duplicate replies collapse: the first reply of a line (in the topic's order) is its
  answer, in the counts and in the output files alike, so every ``custom_id`` is answered once.
* **Bounded.** At most ``batch.max_in_flight_lines`` lines of a batch are produced and unanswered at once;
  a line unanswered for ``line_timeout_s`` is produced again, ``line_attempts`` times at most, then answered
  with a ``timeout`` error line. A line's deadline at the agent is the batch's ``expires_at`` (24 h).
* **Progress.** ``request_counts`` are written every ``progress_interval_s`` while they change. When every
  line is answered: ``finalizing``, the output and error files are written (ids derived from the batch
  id, so a runner that dies while writing writes the same files again), ``completed``, and the batch's reply
  topic is deleted.
* **Cancel** (``{batch_id}:cancel``, written by any edge): no more lines are produced; lines in flight may
  still be answered for ``cancel_grace_s``; the files hold what was answered; ``cancelled`` with counts
  (``completed + failed <= total``). **Expiry** (``expires_at`` passed): the same, ``expired``, and every
  unanswered line is an error line ``batch_expired``.

What can go wrong: a runner that raises (Kafka away for longer than the producer's timeout, a bug) is
restarted with backoff, ``batch.driver_attempts`` times, then the batch is marked ``failed``. The edge's group
loop (``BatchRunners._run``) retries a failed fetch or commit with a backoff up to 30 s while the failure may
pass (the broker away), and stops at a permanent one (the group or jobs topic not authorised), which
``/health`` then reports as ``degraded`` with the error (``edge.batch_runners``). Two runners
at once are possible only when a paused edge outlives its session (not on SIGKILL); both write the same
files under the same ids, and each line is still answered once in them. A deployment whose
``reply_to_allow`` leaves out ``{prefix}.replies.*`` cannot run batches (every line is dead-lettered and
then times out).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from api.batch_lines import (
    TERMINAL,
    LineError,
    LineWork,
    advance,
    line_of,
    output_line,
    parse_lines,
    render_reply,
    request_id,
)
from api.edge import request_record
from schemas import ReplyEvent
from schemas.batch import BatchCancel, BatchErrorEntry, BatchJob, BatchState, BatchStatus, RequestCounts, StoredFile
from streams.failures import Verdict, classify
from streams.files import FileStore, FileWriter
from streams.kafka_security import client_options
from streams.ktable import CompactedTable
from streams.settings import Settings
from streams.topics import batch_results_topic, batch_topics, drop_topics, ensure_topics, service_topics

log = logging.getLogger(__name__)

COMPACTED = {"cleanup.policy": "compact"}
POLL_MS = 200
RETRY_FIRST_S = 0.5  # BatchRunners: the first wait after a failed round (retriable or unknown), doubled each time
RETRY_MAX_S = 30.0


def output_file_id(batch_id: str, kind: str) -> str:
    return f"file-{batch_id.removeprefix('batch_')}-{kind}"


class BatchStore:
    """The shared state: files and batches (compacted topics), and the job topic's producer side."""

    def __init__(self, settings: Settings, producer: AIOKafkaProducer) -> None:
        self.settings = settings
        self.producer = producer
        self.topics = batch_topics(settings.topic_prefix)
        self.files = FileStore(settings, self.topics.files, producer)
        self.batches = CompactedTable(settings, self.topics.batches, producer)

    async def start(self) -> None:
        await ensure_topics(self.settings, [(self.topics.files, 1), (self.topics.batches, 1)], COMPACTED)
        await ensure_topics(self.settings, [(self.topics.jobs, self.settings.partitions)])
        await self.files.start()
        await self.batches.start()

    async def stop(self) -> None:
        await self.files.stop()
        await self.batches.stop()

    def state(self, batch_id: str) -> BatchState | None:
        raw = self.batches.get(batch_id)
        return None if raw is None else BatchState.model_validate_json(raw)

    def cancel_of(self, batch_id: str) -> BatchCancel | None:
        raw = self.batches.get(f"{batch_id}:cancel")
        return None if raw is None else BatchCancel.model_validate_json(raw)

    async def find(self, batch_id: str) -> BatchState | None:
        """``state``, asking again once this edge has read the whole topic (a batch another edge made)."""
        found = self.state(batch_id)
        if found is None:
            with contextlib.suppress(TimeoutError):
                await self.batches.sync()
            found = self.state(batch_id)
        return found

    def all(self) -> list[BatchState]:
        return [BatchState.model_validate_json(raw) for key, raw in list(self.batches.values.items()) if ":" not in key]

    async def write(self, state: BatchState) -> BatchState:
        await self.batches.put(state.id, state.model_dump_json().encode())
        return state

    async def create(self, state: BatchState) -> None:
        """Store a new batch, then the job that makes an edge run it."""
        await self.write(state)
        job = BatchJob(batch_id=state.id).model_dump_json().encode()
        await self.producer.send_and_wait(self.topics.jobs, job, key=state.id.encode())

    async def cancel(self, batch_id: str) -> None:
        record = BatchCancel(batch_id=batch_id, at=int(time.time()))
        await self.batches.put(f"{batch_id}:cancel", record.model_dump_json().encode())


class _Replies:
    """A batch's reply topic, read from its start (manual assignment, no group)."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.tp = TopicPartition(topic, 0)
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=POLL_MS,
            **client_options(settings),
        )

    async def __aenter__(self) -> _Replies:
        await self.consumer.start()
        self.consumer.assign([self.tp])
        await self.consumer.seek_to_beginning(self.tp)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.consumer.stop()

    async def poll(self, timeout_ms: int = POLL_MS) -> list[ReplyEvent]:
        fetched = await self.consumer.getmany(self.tp, timeout_ms=timeout_ms)
        replies = []
        for record in fetched.get(self.tp, []):
            try:
                replies.append(ReplyEvent.model_validate_json(record.value or b""))
            except ValidationError:
                log.warning("%s: a record that is no reply at offset %d, skipped", self.tp.topic, record.offset)
        return replies

    async def until_end(self) -> list[ReplyEvent]:
        """Everything up to the topic's end as it is now."""
        end = (await self.consumer.end_offsets([self.tp]))[self.tp]
        out: list[ReplyEvent] = []
        while await self.consumer.position(self.tp) < end:
            out += await self.poll()
        return out


class BatchDriver:
    """Runs one batch to a terminal status (see the module docstring)."""

    def __init__(self, store: BatchStore, models: Callable[[], Mapping[str, Mapping[str, str]]], batch_id: str) -> None:
        self.store = store
        self.settings = store.settings
        self.config = store.settings.batch
        self.models = models
        self.batch_id = batch_id
        self.topic = batch_results_topic(self.settings.topic_prefix, batch_id)
        self.answered: dict[int, bool] = {}  # line -> ok, the first reply of each line
        self.sent: dict[int, tuple[float, int]] = {}  # line -> (last produced, attempts)
        self.timed_out: set[int] = set()

    async def run(self) -> None:
        await self.store.batches.sync(30.0)
        state = self.store.state(self.batch_id)
        if state is None:
            log.warning("batch job %s names no batch; skipped", self.batch_id)
            return
        if state.status in TERMINAL:
            await drop_topics(self.settings, [self.topic])  # a runner that died after the end left it behind
            return
        stored = self.store.files.get(state.input_file_id)
        if stored is None:
            await self._fail(state, "file_not_found", f"input file {state.input_file_id} does not exist")
            return
        try:
            content = await self.store.files.content(stored)
        except FileNotFoundError as exc:
            await self._fail(state, "file_not_found", str(exc))
            return
        lines = parse_lines(self.batch_id, content, state.endpoint, self.models())
        if not lines:
            await self._fail(state, "empty_file", "the input file holds no requests")
            return
        work = {line.line: line for line in lines if isinstance(line, LineWork)}
        refused = [line for line in lines if isinstance(line, LineError)]
        await ensure_topics(self.settings, [(self.topic, 1)])
        if state.status == "validating":
            counts = RequestCounts(total=len(lines), completed=0, failed=len(refused))
            state = await self.store.write(advance(state, "in_progress", int(time.time()), request_counts=counts))
        async with _Replies(self.settings, self.topic) as replies:
            self._take(await replies.until_end(), work)
            state = await self._drive(state, work, refused, replies)
        await drop_topics(self.settings, [self.topic])

    def _take(self, replies: list[ReplyEvent], work: Mapping[int, LineWork]) -> bool:
        """Record the first reply of each line; whether any was new."""
        new = False
        for reply in replies:
            line = line_of(self.batch_id, reply.id)
            if line is None or line not in work or line in self.answered or line in self.timed_out:
                continue
            self.answered[line] = reply.ok
            self.sent.pop(line, None)
            new = True
        return new

    def _counts(self, total: int, refused: int) -> RequestCounts:
        ok = sum(self.answered.values())
        failed = len(self.answered) - ok + len(self.timed_out) + refused
        return RequestCounts(total=total, completed=ok, failed=failed)

    async def _drive(
        self, state: BatchState, work: dict[int, LineWork], refused: list[LineError], replies: _Replies
    ) -> BatchState:
        total = len(work) + len(refused)
        if state.status == "finalizing":  # a runner died while writing the files: write them again
            return await self._finish(state, work, refused, "completed")
        todo = deque(line for line in sorted(work) if line not in self.answered)
        written = state.request_counts
        last_write = time.monotonic()
        while True:
            now = time.time()
            cancel = self.store.cancel_of(self.batch_id)
            if cancel is not None or state.status == "cancelling":
                return await self._stop(state, work, refused, replies, "cancelled", cancel)
            if now >= state.expires_at:
                return await self._stop(state, work, refused, replies, "expired", None)
            self._take(await replies.poll(), work)
            due, new = self._due(now), list[int]()
            while todo and len(self.sent) + len(new) < self.config.max_in_flight_lines:
                line = todo.popleft()
                if line not in self.answered and line not in self.timed_out and line not in self.sent:
                    new.append(line)
            await self._produce([work[line] for line in due + new], state, now)
            if len(self.answered) + len(self.timed_out) == len(work):
                break
            counts = self._counts(total, len(refused))
            if counts != written and time.monotonic() - last_write >= self.config.progress_interval_s:
                state = await self.store.write(advance(state, state.status, int(now), request_counts=counts))
                written, last_write = counts, time.monotonic()
        state = await self.store.write(advance(state, "finalizing", int(time.time()),
                                               request_counts=self._counts(total, len(refused))))  # fmt: skip
        return await self._finish(state, work, refused, "completed")

    def _due(self, now: float) -> list[int]:
        """Lines unanswered past ``line_timeout_s``: to produce again, or timed out after ``line_attempts``."""
        due = []
        for line, (since, attempts) in list(self.sent.items()):
            if now - since < self.config.line_timeout_s:
                continue
            if attempts >= self.config.line_attempts:
                del self.sent[line]
                self.timed_out.add(line)
            else:
                due.append(line)
        return due

    async def _produce(self, lines: list[LineWork], state: BatchState, now: float) -> None:
        """Produce ``lines`` to their service's bulk lane, counting an attempt for each."""
        if not lines:
            return
        futures = []
        for work in lines:
            rid = request_id(self.batch_id, work.line)
            record = request_record(rid, self.batch_id, work.task, work.payload, self.topic, state.expires_at * 1000)
            topic = service_topics(self.settings.topic_prefix, work.service).lane(bulk=True)
            futures.append(await self.store.producer.send(topic, record, key=rid.encode()))
            _, attempts = self.sent.get(work.line, (now, 0))
            self.sent[work.line] = (now, attempts + 1)
        await asyncio.gather(*futures)

    async def _stop(
        self,
        state: BatchState,
        work: dict[int, LineWork],
        refused: list[LineError],
        replies: _Replies,
        status: BatchStatus,
        cancel: BatchCancel | None,
    ) -> BatchState:
        """Cancel or expiry: produce nothing more, let the lines in flight answer (cancel: within the grace)."""
        now = int(time.time())
        if status == "cancelled" and state.status != "cancelling":
            state = await self.store.write(advance(state, "cancelling", cancel.at if cancel else now))
        grace_end = (cancel.at if cancel else now) + (self.config.cancel_grace_s if status == "cancelled" else 0)
        while self.sent and time.time() < grace_end:
            self._take(await replies.poll(), work)
        self._take(await replies.until_end(), work)
        return await self._finish(state, work, refused, status)

    async def _finish(
        self, state: BatchState, work: dict[int, LineWork], refused: list[LineError], status: BatchStatus
    ) -> BatchState:
        """Write the output and error files from the reply topic (first reply of each line), then ``status``."""
        created = int(time.time())
        base = StoredFile(id="", bytes=0, created_at=created, filename="", purpose="batch_output", chunks=0,
                          owner=state.owner)  # fmt: skip
        out = FileWriter(
            self.store.files,
            base.model_copy(
                update={"id": output_file_id(self.batch_id, "output"), "filename": f"{self.batch_id}_output.jsonl"}
            ),
        )
        err = FileWriter(self.store.files, base.model_copy(update={
            "id": output_file_id(self.batch_id, "errors"), "filename": f"{self.batch_id}_error.jsonl"}))  # fmt: skip
        done: set[int] = set()
        ok = failed = 0
        async with _Replies(self.settings, self.topic) as replies:
            for reply in await replies.until_end():
                line = line_of(self.batch_id, reply.id)
                if line is None or line not in work or line in done or line in self.timed_out:
                    continue
                done.add(line)
                good, rendered = render_reply(self.batch_id, work[line], reply, created)
                await (out if good else err).add(orjson.dumps(rendered))
                ok, failed = ok + good, failed + (not good)
        for refusal in refused:
            await err.add(orjson.dumps(refusal.output))
        failed += len(refused)
        unanswered = [line for line in sorted(work) if line not in done]
        for line in unanswered:
            if line in self.timed_out or status == "expired":
                code = "timeout" if line in self.timed_out else "batch_expired"
                message = "no answer after the line's attempts" if code == "timeout" else "the batch expired first"
                error = {"code": code, "message": f"line {line}: {message}"}
                await err.add(orjson.dumps(output_line(self.batch_id, line, work[line].custom_id, None, None, error)))
                failed += 1
        output = await out.close() if out.lines else None
        errors = await err.close() if err.lines else None
        counts = RequestCounts(total=len(work) + len(refused), completed=ok, failed=failed)
        files = {"output_file_id": output.id if output else None, "error_file_id": errors.id if errors else None}
        final = advance(state, status, int(time.time()), request_counts=counts, **files)
        return await self.store.write(final)

    async def _fail(self, state: BatchState, code: str, message: str) -> None:
        error = BatchErrorEntry(code=code, message=message)
        await self.store.write(advance(state, "failed", int(time.time()), errors=[error]))


class BatchRunners(ConsumerRebalanceListener):  # type: ignore[misc]
    """This edge's share of the batch runners' group: one ``BatchDriver`` task per job of its partitions."""

    def __init__(self, store: BatchStore, models: Callable[[], Mapping[str, Mapping[str, str]]]) -> None:
        self.store = store
        self.settings = store.settings
        self.models = models
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            group_id=store.topics.runners_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=int(self.settings.session_timeout_s * 1000),
            heartbeat_interval_ms=max(int(self.settings.session_timeout_s * 1000) // 3, 100),
            fetch_max_wait_ms=500,
            **client_options(self.settings),
        )
        self.active: dict[TopicPartition, dict[int, asyncio.Task[None]]] = {}
        self.next_offset: dict[TopicPartition, int] = {}
        self._dirty = False
        self._task: asyncio.Task[None] | None = None
        self.failure: str | None = None  # what stopped the group loop (permanent); /health reports it
        self.last_error: str | None = None
        self.failed_rounds = 0  # rounds failed in a row (retried)

    @property
    def running(self) -> list[str]:
        return [task.get_name() for tasks in self.active.values() for task in tasks.values()]

    async def start(self) -> None:
        await self.consumer.start()
        self.consumer.subscribe([self.store.topics.jobs], listener=self)
        self._task = asyncio.create_task(self._run(), name="batch-runners")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._stop_drivers(list(self.active))
        await self.consumer.stop()

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self._stop_drivers(revoked)
        with contextlib.suppress(Exception):  # policy: a commit lost here only means a job read again
            await self._commit(revoked)
        for tp in revoked:
            self.active.pop(tp, None)
            self.next_offset.pop(tp, None)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        for tp in assigned:
            self.active.setdefault(tp, {})

    async def _stop_drivers(self, partitions: list[TopicPartition]) -> None:
        tasks = [task for tp in partitions for task in self.active.get(tp, {}).values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _committable(self, tp: TopicPartition) -> int | None:
        active = [offset for offset, task in self.active.get(tp, {}).items() if not task.done()]
        return min(active) if active else self.next_offset.get(tp)

    async def _commit(self, partitions: list[TopicPartition]) -> None:
        offsets = {tp: offset for tp in partitions if (offset := self._committable(tp)) is not None}
        if offsets:
            await self.consumer.commit(offsets)

    def state(self) -> dict[str, object]:
        """For ``/health``: whether the group loop runs, the batches this edge runs, the failure that stopped
        the loop (permanent) or the consecutive failed rounds it is retrying (retriable or unknown)."""
        return {
            "running": self._task is not None and not self._task.done(),
            "batches": len(self.running),
            "failed_rounds": self.failed_rounds,
            "error": self.failure or self.last_error,
        }

    async def _run(self) -> None:
        """Fetch jobs and commit finished ones until cancelled (edge shutdown) or a permanent failure.

        A failed round is classified (``streams.failures.classify``): a **permanent** one (the group or the jobs
        topic not authorised, an invalid request: no retry can fix it) stops the loop and is kept in
        ``failure``, which ``/health`` reports (status degraded: the edge still serves every other route); a
        **retriable** or **unknown** one (the broker away, a bug) is retried after a backoff doubling from
        ``RETRY_FIRST_S`` to ``RETRY_MAX_S``, and ``failed_rounds`` counts the rounds failed in a row."""
        delay = RETRY_FIRST_S
        while True:
            try:
                await self._round()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # policy: classified; permanent stops the loop, the rest is retried
                self.failed_rounds += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                # Only a Kafka error can be permanent here: classify's ValueError/TypeError are a send's bad
                # record, which this loop never sends; raised here they are a bug, retried like any unknown.
                if isinstance(exc, KafkaError) and classify(exc) is Verdict.PERMANENT:
                    self.failure = self.last_error
                    log.error("batch runners stopped: %s cannot succeed when retried (fix the deployment: "
                              "ACLs on the group %s and the topic %s)", self.failure,
                              self.store.topics.runners_group, self.store.topics.jobs)  # fmt: skip
                    return
                log.warning("batch runners: a round failed (%d in a row; again in %.1fs)", self.failed_rounds,
                            delay, exc_info=True)  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
            else:
                if self.failed_rounds:
                    log.info("batch runners: recovered after %d failed rounds", self.failed_rounds)
                self.failed_rounds, self.last_error, delay = 0, None, RETRY_FIRST_S

    async def _round(self) -> None:
        fetched = await self.consumer.getmany(timeout_ms=500)
        for tp, records in fetched.items():
            for record in records:
                self._begin(tp, record.offset, record.value)
            if records:
                self.next_offset[tp] = records[-1].offset + 1
                self._dirty = True
        if self._dirty:
            self._dirty = False
            for tasks in self.active.values():
                for offset in [o for o, t in tasks.items() if t.done()]:
                    del tasks[offset]
            await self._commit(list(self.active))

    def _begin(self, tp: TopicPartition, offset: int, value: bytes | None) -> None:
        try:
            job = BatchJob.model_validate_json(value or b"")
        except ValidationError:
            log.warning("batch job at %s[%d] is unreadable; skipped", tp.topic, offset)
            return
        task = asyncio.create_task(self._drive(job.batch_id), name=job.batch_id)
        self.active.setdefault(tp, {})[offset] = task
        task.add_done_callback(lambda _: setattr(self, "_dirty", True))

    async def _drive(self, batch_id: str) -> None:
        """Run one batch; on an error retry with backoff, ``driver_attempts`` times, then mark it failed."""
        attempts = self.settings.batch.driver_attempts
        for attempt in range(1, attempts + 1):
            try:
                await BatchDriver(self.store, self.models, batch_id).run()
                return
            except asyncio.CancelledError:
                raise
            except Exception:  # policy: retried a bounded number of times, then the batch fails
                log.exception("batch %s: runner failed (attempt %d of %d)", batch_id, attempt, attempts)
                if attempt < attempts:
                    await asyncio.sleep(min(2.0**attempt, 30.0))
        state = self.store.state(batch_id)
        if state is not None and state.status not in TERMINAL and state.status != "cancelling":
            error = BatchErrorEntry(code="internal", message=f"the runner failed {attempts} times (see the edge's log)")
            with contextlib.suppress(Exception):
                await self.store.write(advance(state, "failed", int(time.time()), errors=[error]))
