"""The send-failure policy (``streams.failures.classify``) as a table: pure, no Kafka.

The promise it holds: only a failure that is the record's or its topic's own fault is PERMANENT (and so
may become a dead letter); an outage is RETRIABLE; anything else, a cancelled ack, a closed producer, a
bug, is UNKNOWN, which the agent retries within its bound and then stops on, never dead-letters.
"""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import errors as kerr

from streams.failures import Verdict, classify


def _wrapped(cause: BaseException) -> BaseException:
    wrapper = RuntimeError("Error while sending")  # how Faust's ProducerSendError carries the cause
    wrapper.__cause__ = cause
    return wrapper


@pytest.mark.parametrize(
    ("exc", "verdict"),
    [
        # The record or its topic is at fault: permanent.
        (kerr.MessageSizeTooLargeError(), Verdict.PERMANENT),
        (kerr.RecordTooLargeError(), Verdict.PERMANENT),
        (kerr.TopicAuthorizationFailedError("dlq"), Verdict.PERMANENT),
        (kerr.ClusterAuthorizationFailedError(), Verdict.PERMANENT),
        (kerr.InvalidTopicError(), Verdict.PERMANENT),
        (kerr.PolicyViolationError(), Verdict.PERMANENT),
        (ValueError("bad partition"), Verdict.PERMANENT),
        (TypeError("value must be bytes"), Verdict.PERMANENT),
        (AssertionError(), Verdict.PERMANENT),
        (_wrapped(kerr.TopicAuthorizationFailedError("dlq")), Verdict.PERMANENT),
        # An outage: retriable.
        (kerr.KafkaConnectionError("refused"), Verdict.RETRIABLE),
        (kerr.NotLeaderForPartitionError(), Verdict.RETRIABLE),
        (kerr.LeaderNotAvailableError(), Verdict.RETRIABLE),
        (kerr.NotEnoughReplicasError(), Verdict.RETRIABLE),
        (kerr.KafkaTimeoutError(), Verdict.RETRIABLE),
        (kerr.RequestTimedOutError(), Verdict.RETRIABLE),
        (kerr.NodeNotReadyError(), Verdict.RETRIABLE),
        (TimeoutError(), Verdict.RETRIABLE),
        (ConnectionResetError(), Verdict.RETRIABLE),
        (kerr.UnknownTopicOrPartitionError(), Verdict.RETRIABLE),  # metadata may still be propagating
        (_wrapped(kerr.KafkaConnectionError("refused")), Verdict.RETRIABLE),
        # Nothing says the record is at fault: unknown (bounded retry, then stop; never a dead letter).
        (asyncio.CancelledError(), Verdict.UNKNOWN),
        (kerr.ProducerClosed(), Verdict.UNKNOWN),
        (RuntimeError("a bug"), Verdict.UNKNOWN),
        (KeyError("x"), Verdict.UNKNOWN),
        (kerr.IllegalStateError(), Verdict.UNKNOWN),
        (kerr.UnknownError(), Verdict.UNKNOWN),
        (_wrapped(kerr.ProducerClosed()), Verdict.UNKNOWN),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_classify_table(exc: BaseException, verdict: Verdict) -> None:
    assert classify(exc) is verdict


def test_an_unknown_topic_is_permanent_only_once_checked_missing() -> None:
    assert classify(kerr.UnknownTopicOrPartitionError(), topic_known=False) is Verdict.PERMANENT
    assert classify(_wrapped(kerr.UnknownTopicOrPartitionError()), topic_known=False) is Verdict.PERMANENT
    # The check is about the topic, not about any failure: an outage stays retriable, a bug unknown.
    assert classify(kerr.KafkaConnectionError(), topic_known=False) is Verdict.RETRIABLE
    assert classify(RuntimeError("a bug"), topic_known=False) is Verdict.UNKNOWN
