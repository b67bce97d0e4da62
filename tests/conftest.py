"""Shared fixtures: the real Kafka and Redis for integration tests.

``infra_settings`` uses the broker and Redis at ``AISEMBLE_KAFKA_BOOTSTRAP`` / ``AISEMBLE_REDIS_URL``
(defaults 127.0.0.1:9092 and :6379) when they answer, as in CI where ``.ci/run`` starts them, and
otherwise starts them through ``infra`` and stops them afterwards. When neither works the fixture
errors: an integration test fails, it never skips.

At the end of the session it deletes the topics the session created on throw-away test prefixes (``t`` and
hex digits, e.g. ``t3f9a0c1d2e.nlp.requests``): left behind, a few hundred per run became 13,000
partitions on a developer's broker, 10% of a core at rest. Set ``AISEMBLE_TEST_KEEP_TOPICS=1`` to keep them
(to look at them, or when several test sessions share one broker at once: one session's sweep would delete
the other's topics).
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Iterator

import pytest

import infra
from streams.settings import Settings
from streams.topics import drop_topics, list_topics

THROWAWAY_TOPIC = re.compile(r"^t[0-9a-f]{6,}[.-]")

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
    before = set() if keep else asyncio.run(list_topics(settings))
    try:
        yield settings
    finally:
        if not keep:
            asyncio.run(_sweep(settings, before))
        local.stop()


async def _sweep(settings: Settings, before: set[str]) -> None:
    """Delete the throw-away test topics created since ``before`` (best effort, logged)."""
    try:
        created = await list_topics(settings) - before
    except Exception:  # noqa: BLE001  (the broker may be the one a test stopped: nothing to sweep)
        return
    await drop_topics(settings, [t for t in created if THROWAWAY_TOPIC.match(t)])
