"""Errors of the agent side. Per-item problems are not exceptions (they become error replies or
dead letters); these are the failures that stop a batch from being acknowledged."""

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
