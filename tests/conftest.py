"""Shared fixtures: the real Kafka and Redis for integration tests.

``infra_settings`` uses the broker and Redis at ``AISEMBLE_KAFKA_BOOTSTRAP`` / ``AISEMBLE_REDIS_URL``
(defaults 127.0.0.1:9092 and :6379) when they answer, as in CI where ``.ci/run`` starts them, and
otherwise starts them through ``infra`` and stops them afterwards. When neither works the fixture
errors: an integration test fails, it never skips.

At the end of the session it deletes the topics of the session's own throw-away prefixes: a session tags
its prefixes (``AISEMBLE_TEST_SESSION``, 4 hex digits, set here; ``aisemble.pipeline.throwaway_prefix``
makes ``t<tag><random hex>``), so a session sharing the broker with another never deletes the other's. Left
behind, a few hundred topics per run became 13,000 partitions on a developer's broker, 10% of a core at rest.
``AISEMBLE_TEST_KEEP_TOPICS=1`` keeps them.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator

import pytest

import infra
from aisemble.pipeline import TEST_SESSION_ENV
from streams.settings import Settings
from streams.topics import drop_topics, list_topics

SESSION_TAG = os.environ.setdefault(TEST_SESSION_ENV, uuid.uuid4().hex[:4])


def session_topic(name: str) -> bool:
    """Whether ``name`` is a topic of this session's throw-away prefixes (``t<tag>...``)."""
    return name.startswith(f"t{SESSION_TAG}")


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def infra_settings() -> Iterator[Settings]:
    settings = Settings(
        kafka_bootstrap=os.environ.get("AISEMBLE_KAFKA_BOOTSTRAP", "127.0.0.1:9092"),
        redis_url=os.environ.get("AISEMBLE_REDIS_URL", "redis://127.0.0.1:6379/0"),
    )
    local = infra.start_local(settings)
    keep = os.environ.get("AISEMBLE_TEST_KEEP_TOPICS", "") not in ("", "0")
    try:
        yield settings
    finally:
        if not keep:
            asyncio.run(_sweep(settings))
        local.stop()


async def _sweep(settings: Settings) -> None:
    """Delete this session's throw-away topics (best effort, logged)."""
    try:
        topics = await list_topics(settings)
    except Exception:  # noqa: BLE001  (the broker may be the one a test stopped: nothing to sweep)
        return
    await drop_topics(settings, [t for t in topics if session_topic(t)])
