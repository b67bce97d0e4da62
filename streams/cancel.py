"""Cancellation of a streaming request: the key the edge sets in Redis when its client goes away.

The edge sets ``cancel_key(prefix, request_id)`` (any value, with a TTL) when a streaming client
disconnects; the LLM agent checks the keys of its active streaming rows (one ``MGET`` at most every
100 ms, through the Redis breaker) and stops such a row, answering it ``cancelled``. Redis away: the key
is not seen and the row runs to its end (the reply is then dropped by the edge); nothing else changes.
"""

from __future__ import annotations


def cancel_key(prefix: str, request_id: str) -> str:
    """The Redis key that asks the agents to stop generating for ``request_id`` (the RequestEvent's id)."""
    return f"{prefix}:cancel:{request_id}"
