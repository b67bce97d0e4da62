"""The send-failure policy, in one place: which Kafka errors are retried and which are permanent.

Retriable: the broker or a partition leader is away for a while (connection refused or reset, leader
moving, not enough in-sync replicas, request or metadata timeouts). The record is sent again with
backoff, for a bounded time (``Settings.delivery_retry_s``), and the agent says so in its heartbeat.

Permanent: sending the same record again can never work (a record larger than the producer or broker
accepts, a topic that does not exist while auto-creation is off, a topic or cluster we are not authorised
for, an invalid topic name or record). What can be dead-lettered is dead-lettered with the reason, and
the agent moves on: a poison event never blocks its partition.

``UnknownTopicOrPartitionError`` carries aiokafka's ``retriable`` flag (metadata may still be
propagating right after a topic is created); we treat it as permanent for a topic we checked exists
nowhere, which is the caller's job (``classify(exc, topic_known=False)``).
"""

from __future__ import annotations

import asyncio
import enum

from aiokafka import errors as kerr


class Verdict(enum.StrEnum):
    RETRIABLE = "retriable"
    PERMANENT = "permanent"


_PERMANENT: tuple[type[BaseException], ...] = (
    kerr.MessageSizeTooLargeError,
    kerr.RecordTooLargeError,
    kerr.RecordListTooLargeError,
    kerr.TopicAuthorizationFailedError,
    kerr.ClusterAuthorizationFailedError,
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
    """Whether sending the same record again may succeed.

    Args:
        exc: what the send (enqueue or broker ack) raised.
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
    if isinstance(exc, _RETRIABLE):
        return Verdict.RETRIABLE
    if isinstance(exc, kerr.KafkaError):
        return Verdict.RETRIABLE if exc.retriable else Verdict.PERMANENT
    # Anything else (a bug, a closed producer) is not fixed by sending again.
    return Verdict.PERMANENT
