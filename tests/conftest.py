"""Shared fixtures: the real Kafka and Redis for integration tests.

``infra_settings`` uses the broker and Redis at ``AISEMBLE_KAFKA_BOOTSTRAP`` / ``AISEMBLE_REDIS_URL``
(defaults 127.0.0.1:9092 and :6379) when they answer, as in CI where ``.ci/run`` starts them, and
otherwise starts them through ``infra`` and stops them afterwards. When neither works the fixture
errors: an integration test fails, it never skips.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

import infra
from streams.settings import Settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def infra_settings() -> Iterator[Settings]:
    settings = Settings(
        kafka_bootstrap=os.environ.get("AISEMBLE_KAFKA_BOOTSTRAP", "127.0.0.1:9092"),
        redis_url=os.environ.get("AISEMBLE_REDIS_URL", "redis://127.0.0.1:6379/0"),
    )
    local = infra.start_local(settings)
    try:
        yield settings
    finally:
        local.stop()
