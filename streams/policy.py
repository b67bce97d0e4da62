"""The reply-topic policy: where an agent may write a reply (part of the wire contract).

A request names its reply topic (``reply_to``); without a policy, anyone who can produce to a request
topic could make an agent write into any topic: another service's request topic (a loop), a results or
DLQ topic, an internal topic, or (with auto-creation on) a brand-new one. So ``reply_to`` must match one of
the allowed globs (``Settings.reply_to_allow``, default ``{prefix}.replies.*`` and
``{prefix}.edge.*.replies``; ``{prefix}`` is replaced by the topic prefix) and must exist. A request that
fails either rule is not run: it is dead-lettered at once as ``reply_to_refused``.

Globs follow ``fnmatch`` (``*`` also matches dots), matched case-sensitively. A pattern never lets a reply
into the service topics (``{prefix}.<service>.requests|bulk|results|dlq``): those are refused whatever the
patterns say, so a broad operator pattern (``{prefix}.*``) cannot create a loop.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

from schemas import SERVICES
from streams.topics import service_topics


@dataclass(frozen=True, slots=True)
class ReplyTopicPolicy:
    """Which ``reply_to`` topics an agent may write to; pure."""

    patterns: tuple[str, ...]
    forbidden: frozenset[str]

    @classmethod
    def build(cls, prefix: str, patterns: Iterable[str]) -> ReplyTopicPolicy:
        expanded = tuple(p.replace("{prefix}", prefix) for p in patterns)
        forbidden = set()
        for service in SERVICES:
            topics = service_topics(prefix, service)
            forbidden |= {topics.requests, topics.bulk, topics.results, topics.dlq}
        return cls(expanded, frozenset(forbidden))

    def refusal(self, topic: str) -> str | None:
        """Why ``topic`` may not receive replies, or None when it may."""
        if topic in self.forbidden:
            return f"reply_to {topic!r} is one of aisemble's service topics"
        if topic.startswith("__"):
            return f"reply_to {topic!r} is an internal topic"
        if not any(fnmatch.fnmatchcase(topic, pattern) for pattern in self.patterns):
            return f"reply_to {topic!r} matches none of the allowed patterns {list(self.patterns)}"
        return None
