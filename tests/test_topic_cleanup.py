"""Throw-away topics are deleted: ``streams.topics.drop_topics`` and ``Pipeline.drop_topics`` on the real broker.

Tests and benchmarks run on fresh topic prefixes; left behind, a few hundred topics per test run grew to
13,000 partitions on a developer's broker (10% of a core at rest). ``tests/conftest.py`` sweeps what a session
created; benchmarks drop their pipeline's prefix when they stop.
"""

from __future__ import annotations

from conftest import SESSION_TAG, session_topic

from aisemble.pipeline import Pipeline, throwaway_prefix
from streams.settings import Settings
from streams.topics import drop_topics, ensure_topics, list_topics, prefix_topics


def test_prefix_topics_takes_only_that_prefix_and_the_sweep_takes_only_this_sessions_tag() -> None:
    names = ["t12ab34cd56.nlp.requests", "t12ab34cd56x.nlp.requests", "t12ab34cd56.edge.e1.replies", "aisemble.x"]
    assert prefix_topics(names, "t12ab34cd56") == ["t12ab34cd56.nlp.requests", "t12ab34cd56.edge.e1.replies"]
    ours, other_tag = throwaway_prefix(), "0000" if SESSION_TAG != "0000" else "1111"
    assert ours.startswith(f"t{SESSION_TAG}") and len(ours) == 11 and throwaway_prefix() != ours
    assert session_topic(f"{ours}.nlp.requests") and session_topic(f"{throwaway_prefix(8)}.size")
    assert not session_topic(f"t{other_tag}abcdef.nlp.requests")  # another session's: never swept by this one
    assert not session_topic("aisemble.nlp.requests") and not session_topic("team.nlp.requests")


async def test_drop_topics_deletes_what_it_is_given_and_nothing_else(infra_settings: Settings) -> None:
    prefix = throwaway_prefix()
    other = throwaway_prefix()
    names = [f"{prefix}.a.requests", f"{prefix}.b.requests", f"{other}.a.requests"]
    await ensure_topics(infra_settings, [(n, 1) for n in names])
    assert set(names) <= await list_topics(infra_settings)
    assert await drop_topics(infra_settings, names[:2] + names[:1]) == 2  # duplicates count once
    left = await list_topics(infra_settings)
    assert not set(names[:2]) & left and names[2] in left
    assert await drop_topics(infra_settings, []) == 0
    assert await drop_topics(infra_settings, names[2:]) == 1


def test_a_pipeline_drops_the_topics_of_its_own_prefix(infra_settings: Settings) -> None:
    import asyncio

    pipeline = Pipeline.isolated(infra_settings, [])
    neighbour = Pipeline.isolated(infra_settings, [])
    mine = [f"{pipeline.prefix}.nlp.requests", f"{pipeline.prefix}.edge.e.replies"]
    theirs = f"{neighbour.prefix}.nlp.requests"
    asyncio.run(ensure_topics(infra_settings, [(n, 1) for n in [*mine, theirs]]))
    assert pipeline.drop_topics() == 2
    left = asyncio.run(list_topics(infra_settings))
    assert not set(mine) & left and theirs in left
    assert neighbour.drop_topics() == 1
