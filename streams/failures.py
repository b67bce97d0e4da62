"""The send-failure policy, in one place: which send failures are retried, and which are permanent.

Three verdicts, and what the agent does with each (``agents.loop``):

* **Permanent**: sending the same record again can never work, because of the record or its topic: a
  record larger than the producer or broker accepts, a topic that does not exist (checked, see below), a
  topic or cluster we are not authorised for, an invalid topic name or record, a value aiokafka refuses to
  serialise or route (``ValueError``/``TypeError``/``AssertionError``). A reply is dead-lettered with the
  reason; a dead letter refused permanently is a deployment fault and stops the agent.
* **Retriable**: the broker or a partition leader is away for a while (connection refused or reset,
  leader moving, not enough in-sync replicas, request or metadata timeouts), or aiokafka flags the error
  ``retriable``. The record is sent again with backoff, for a bounded time (``Settings.delivery_retry_s``),
  and the agent says so in its heartbeat; past the bound the agent stops without acknowledging.
* **Unknown**: anything else (a cancelled ack future, a closed producer, an error of Faust or of ours, a
  Kafka error we have not classified). Nothing says the record is at fault, so dead-lettering it would
  write a wrong answer (and usually fails the same way): it is handled like a retriable failure (bounded
  retry, then stop without acknowledging), and logged as unknown. Only an explicit ``PERMANENT`` verdict
  ever leads to a dead letter: callers must test ``is Verdict.PERMANENT``, never ``is Verdict.RETRIABLE``.

``UnknownTopicOrPartitionError`` carries aiokafka's ``retriable`` flag (metadata may still be propagating
right after a topic is created, or a leader is moving); it is permanent only for a topic that a fresh
metadata check found missing, which is the caller's job (``classify(exc, topic_known=False)``).
"""

from __future__ import annotations

import asyncio
import enum

from aiokafka import errors as kerr


class Verdict(enum.StrEnum):
    RETRIABLE = "retriable"
    PERMANENT = "permanent"
    UNKNOWN = "unknown"  # handled as retriable (bounded retry, then stop): never dead-lettered


_PERMANENT: tuple[type[BaseException], ...] = (
    kerr.MessageSizeTooLargeError,
    kerr.RecordTooLargeError,
    kerr.RecordListTooLargeError,
    kerr.TopicAuthorizationFailedError,
    kerr.ClusterAuthorizationFailedError,
    kerr.GroupAuthorizationFailedError,  # a consumer group we may not join (BatchRunners; never from a send)
    kerr.InvalidTopicError,
    kerr.InvalidRequestError,
    kerr.CorruptRecordException,
    kerr.UnsupportedForMessageFormatError,
    kerr.PolicyViolationError,
    kerr.InvalidTimestampError,
    kerr.InvalidRequiredAcksError,
    kerr.UnsupportedVersionError,
    ValueError,  # aiokafka refuses a record it cannot serialise or route (bad key/value/partition)
    TypeError,
    AssertionError,  # aiokafka asserts value types before it enqueues
)

_RETRIABLE: tuple[type[BaseException], ...] = (
    kerr.KafkaTimeoutError,
    kerr.RequestTimedOutError,
    kerr.KafkaConnectionError,
    kerr.NodeNotReadyError,
    kerr.NoBrokersAvailable,
    kerr.NotEnoughReplicasError,
    kerr.NotEnoughReplicasAfterAppendError,
    kerr.LeaderNotAvailableError,
    kerr.NotLeaderForPartitionError,
    kerr.KafkaStorageError,
    TimeoutError,
    asyncio.TimeoutError,
    ConnectionError,
)


def classify(exc: BaseException, *, topic_known: bool = True) -> Verdict:
    """Whether sending the same record again may succeed (see the module docstring).

    Args:
        exc: what the send (enqueue or broker ack) raised; a cancelled ack is ``asyncio.CancelledError``.
        topic_known: False when the topic was looked up and does not exist; an unknown-topic error is then
            permanent instead of retriable.
    """
    cause = exc.__cause__
    if not isinstance(exc, kerr.KafkaError) and isinstance(cause, kerr.KafkaError):
        exc = cause  # Faust wraps the producer's KafkaError in its own ProducerSendError
    if isinstance(exc, kerr.UnknownTopicOrPartitionError):
        return Verdict.RETRIABLE if topic_known else Verdict.PERMANENT
    if isinstance(exc, _PERMANENT):
        return Verdict.PERMANENT
    if isinstance(exc, _RETRIABLE) or (isinstance(exc, kerr.KafkaError) and exc.retriable):
        return Verdict.RETRIABLE
    # A closed producer (ProducerClosed), a cancelled ack, a bug, an unclassified Kafka error: not the
    # record's fault as far as we know, so never a dead letter.
    return Verdict.UNKNOWN
