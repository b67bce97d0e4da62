"""Errors of the agent side. Per-item problems are not exceptions (they become error replies or
dead letters); these are the failures that stop a batch from being acknowledged (the agent then exits
with status 3 and its unacknowledged events are delivered again)::

    AgentError
    └── DeliveryError              a reply or dead letter could not be written (retries ran out)
        └── DeadLetterRefusedError the broker refused a dead letter for good: a deployment fault
"""

from __future__ import annotations


class AgentError(Exception):
    """Root of the agent errors."""

    retriable = False


class DeliveryError(AgentError):
    """A batch's replies or dead letters could not be written to Kafka.

    The batch is not acknowledged, so its offsets are not committed and the events are delivered again
    (at-least-once); the edge drops the duplicate replies.
    """

    retriable = True


class DeadLetterRefusedError(DeliveryError):
    """The broker refused a dead letter permanently (the dead-letter topic is missing, not writable by this
    agent, or smaller than the event limit): a deployment fault, not a property of the event. Nothing is
    acknowledged; the agent stops, and serves the events again once the topic is fixed."""

    retriable = False
