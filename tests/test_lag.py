"""Consumer lag against the real broker: a paused agent's backlog as ``aisemble lag --json`` and ``GET /lag``
report it equals what the admin API says, and drains after SIGCONT; groups without commits or without live
members are shown, not hidden; concurrent ``/lag`` calls share one broker sample."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer

from aisemble.pipeline import Pipeline
from streams.kafka_security import client_options
from streams.settings import Settings
from streams.topics import consumer_group, service_topics
from tests.kafka_client import RawClient, committed_and_end

pytestmark = pytest.mark.integration

BACKLOG = 3000
AFTER_STOP = 20


def _events(client: RawClient, count: int) -> list[dict[str, object]]:
    return [
        {"id": f"lag-{uuid.uuid4().hex[:12]}", "task": "analyze", "input": {"records": [{"v": i}]},
         "reply_to": client.reply_topic, "cache": False}
        for i in range(count)
    ]  # fmt: skip


def _cli_lag(pipeline: Pipeline, *args: str) -> dict[str, object]:
    """``aisemble lag --json`` in its own process, with the pipeline's environment (and both services' groups)."""
    env = {**pipeline.env, "AISEMBLE_SERVICES": json.dumps(["data", "nlp"])}
    done = subprocess.run(
        [sys.executable, "-m", "aisemble", "lag", "--json", *args],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    document: dict[str, object] = json.loads(done.stdout)
    return document


def _group(document: dict[str, object], name: str) -> dict[str, object]:
    groups = document["groups"]
    assert isinstance(groups, list)
    found = [g for g in groups if g["group"] == name]
    assert found, f"group {name} not shown: {[g['group'] for g in groups]}"
    return dict(found[0])


async def _http_lag(http: httpx.AsyncClient, url: str) -> dict[str, object]:
    response = await http.get(f"{url}/lag")
    assert response.status_code == 200, response.text
    document: dict[str, object] = response.json()
    return document


async def _admin_lag(settings: Settings, group: str, topic: str) -> int:
    committed, end = await committed_and_end(settings, group, topic)
    return end - committed


@pytest.mark.fault
async def test_a_paused_agents_lag_matches_the_broker_and_drains(infra_settings: Settings, tmp_path: Path) -> None:
    pipeline = Pipeline.isolated(infra_settings, ["data"], tmp_path).start()
    settings = pipeline.settings
    group = consumer_group(pipeline.prefix, "data")
    topic = service_topics(pipeline.prefix, "data").requests
    adhoc_group = f"{pipeline.prefix}-adhoc-reader"  # joins, never commits
    pid = pipeline.procs["data"].pid
    paused = False
    figures: dict[str, object] = {"backlog": BACKLOG}
    adhoc = AIOKafkaConsumer(
        topic, bootstrap_servers=settings.kafka_bootstrap, group_id=adhoc_group, enable_auto_commit=False,
        **client_options(settings),
    )  # fmt: skip
    try:
        async with httpx.AsyncClient(timeout=30) as http, RawClient(settings) as client:
            # The agent's group must be formed before the pause, so the lag is the group's and not an absent one's.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while _group(await _http_lag(http, pipeline.url), group)["state"] != "Stable":
                assert loop.time() < deadline, "the data agents' group never became Stable"
                await asyncio.sleep(0.5)

            os.kill(pid, signal.SIGSTOP)
            paused = True
            await adhoc.start()
            await client.send_many("data", _events(client, BACKLOG))
            expected = await _admin_lag(settings, group, topic)
            assert expected >= BACKLOG

            cli = _cli_lag(pipeline, "--interval", "0.5")
            via_http = await _http_lag(http, pipeline.url)
            cli_data, http_data = _group(cli, group), _group(via_http, group)
            assert cli_data["lag"] == expected
            assert http_data["lag"] == expected
            assert await _admin_lag(settings, group, topic) == expected  # nothing moved while paused
            assert cli_data["rate_per_s"] == 0.0 and cli_data["drain"] == "not draining"
            partitions = cli_data["partitions"]
            assert isinstance(partitions, list)
            assert sorted(p["partition"] for p in partitions if p["topic"] == topic) == list(range(settings.partitions))
            bulk = service_topics(pipeline.prefix, "data").bulk  # the bulk lane: the agents read it too
            assert {p["topic"] for p in partitions} == {topic, bulk}  # not Faust's leader topic
            figures["paused"] = {"cli": {k: cli_data[k] for k in ("state", "members", "lag", "rate_per_s", "drain")},
                                 "admin_lag": expected}

            # A group with no commits: lag from the log start (here 0), i.e. everything in the topic.
            _, end = await committed_and_end(settings, adhoc_group, topic)
            new_group = _group(cli, adhoc_group)
            assert new_group["lag"] == end
            assert all(p["committed"] is None for p in new_group["partitions"])  # type: ignore[union-attr]
            # A configured service's group that does not exist yet is shown too (state Dead, no lag here).
            absent = _group(cli, consumer_group(pipeline.prefix, "nlp"))
            assert absent["state"] == "Dead" and absent["members"] == 0 and absent["lag"] == 0

            # Concurrent calls share one broker sample (at most once per second): one or two distinct samples.
            burst = await asyncio.gather(*(_http_lag(http, pipeline.url) for _ in range(20)))
            samples_seen = len({d["taken_at"] for d in burst})
            assert samples_seen <= 2
            figures["burst_of_20_distinct_samples"] = samples_seen

            os.kill(pid, signal.SIGCONT)
            paused = False
            resumed = time.monotonic()
            seen: list[dict[str, object]] = []
            while True:
                data = _group(await _http_lag(http, pipeline.url), group)
                seen.append({"t_s": round(time.monotonic() - resumed, 1), "lag": data["lag"],
                             "rate_per_s": data["rate_per_s"], "drain": data["drain"], "state": data["state"]})
                if data["lag"] == 0:
                    break
                assert time.monotonic() - resumed < 180, f"the backlog did not drain: {seen[-3:]}"
                await asyncio.sleep(0.5)
            figures["drained_after_s"] = round(time.monotonic() - resumed, 1)
            figures["samples"] = [s for i, s in enumerate(seen) if i == 0 or s != seen[i - 1]][:40]
            assert await _admin_lag(settings, group, topic) == 0

            replies = await client.read(client.reply_topic, BACKLOG, timeout_s=120, distinct="id")
            answered = len({r["id"] for r in replies})

            # A group with no live members: stop the agent; the group stays listed (Empty) with its lag.
            pipeline.kill("data", signal.SIGTERM)
            await client.send_many("data", _events(client, AFTER_STOP))
            cli = _cli_lag(pipeline, "--interval", "0")
            stopped = _group(cli, group)
            assert stopped["state"] == "Empty" and stopped["members"] == 0
            assert stopped["lag"] == AFTER_STOP == await _admin_lag(settings, group, topic)
            figures["no_members"] = {k: stopped[k] for k in ("state", "members", "lag", "drain")}
        counts = {"test": "lag_paused_agent", "sent": BACKLOG, "answered": answered, "dead_lettered": 0,
                  "lost": BACKLOG - answered, "sent_after_agent_stopped": AFTER_STOP}
        print("FAULT-COUNTS: " + json.dumps(counts))
        print("LAG-FIGURES: " + json.dumps(figures))
        assert counts["lost"] == 0
    finally:
        if paused:
            os.kill(pid, signal.SIGCONT)
        await adhoc.stop()
        pipeline.stop()
