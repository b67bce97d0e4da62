"""A cluster, not one broker: the pipeline on a local 3-node KRaft cluster survives a SIGKILL of the broker
that leads the request topic's partition 0 while 1,000 requests are in flight, and the cluster heals.

The cluster is our own (tmp dirs, free ports; stopped by PID); Redis is the shared one. Counted per
request: 200 answered / 504 deadline / other status / no HTTP answer at all; all but 200 are lost. Printed as
``FAULT-COUNTS:`` with the failover and heal times; nothing is asserted about times. Asserted: requests were
in flight at the kill, partition 0 got a new leader, and every id got its 200 answer (a 504 or any other
status fails the test) with a reply on the edge's reply topic.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import murmur2

from aisemble.pipeline import Pipeline
from infra.cluster import ClusterHandle, cluster_bootstrap, cluster_config, free_base_port, start_cluster
from streams.settings import Settings
from streams.topics import edge_reply_topic

TOTAL = 1000
CONCURRENCY = 200
KILL_AFTER = 150  # answered requests before the leader is killed
HTTP_TIMEOUT_S = 60.0
PARTITIONS = 4
# A partition whose leader was SIGKILLed has no leader until the controller fences that broker
# (broker.session.timeout.ms, 9 s by default) and elects another: on a cluster the edge must give Kafka
# longer than that to take a request, or it answers 503 through every failover (1 s by default).
PRODUCE_TIMEOUT_S = 20.0


def test_cluster_config_is_a_static_quorum_with_rf_3_on_loopback(tmp_path: Path) -> None:
    configs = [cluster_config(i, 19092, 3, tmp_path / f"node-{i}") for i in (1, 2, 3)]
    assert cluster_bootstrap(19092) == "127.0.0.1:19092,127.0.0.1:19094,127.0.0.1:19096"
    voters = "1@127.0.0.1:19093,2@127.0.0.1:19095,3@127.0.0.1:19097"
    for node_id, config in enumerate(configs, start=1):
        port = 19092 + 2 * (node_id - 1)
        assert config["node.id"] == str(node_id)
        assert config["process.roles"] == "broker,controller"
        assert config["controller.quorum.voters"] == voters
        assert "controller.quorum.bootstrap.servers" not in config  # static quorum: format without --standalone
        assert config["listeners"] == f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{port + 1}"
        assert config["log.dirs"] == str(tmp_path / f"node-{node_id}")
        for key in (
            "default.replication.factor",
            "offsets.topic.replication.factor",
            "transaction.state.log.replication.factor",
            "share.coordinator.state.topic.replication.factor",
        ):
            assert config[key] == "3", key
        for key in ("min.insync.replicas", "transaction.state.log.min.isr", "share.coordinator.state.topic.min.isr"):
            assert config[key] == "2", key
        assert config["auto.create.topics.enable"] == "false"
        assert config["group.initial.rebalance.delay.ms"] == "0"
        assert "0.0.0.0" not in config["listeners"] + config["advertised.listeners"]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ClusterHandle]:
    handle = start_cluster(free_base_port(), tmp_path / "cluster")
    try:
        yield handle
    finally:
        handle.stop()


def _partition_of(request_id: str) -> int:
    """The partition the edge's producer picks for this key (aiokafka's default partitioner)."""
    return (murmur2(request_id.encode()) & 0x7FFFFFFF) % PARTITIONS


async def _reply_counts(bootstrap: str, topic: str) -> Counter[str]:
    """How many replies each request id got on the edge's reply topic (more than 1: a duplicate dropped)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        counts: Counter[str] = Counter()
        async with asyncio.timeout(30):
            while await consumer.position(tp) < end:
                for records in (await consumer.getmany(tp, timeout_ms=1000)).values():
                    for record in records:
                        if record.value is not None:
                            counts[json.loads(record.value)["id"]] += 1
        return counts
    finally:
        await consumer.stop()


@pytest.mark.integration
@pytest.mark.fault
async def test_leader_kill_mid_load_loses_no_request(
    cluster: ClusterHandle, infra_settings: Settings, tmp_path: Path
) -> None:
    settings = infra_settings.model_copy(update={"kafka_bootstrap": cluster.bootstrap, "replication_factor": 3})
    # Pipeline passes bootstrap, Redis and prefix to its processes, not replication_factor: name it too.
    pipeline = Pipeline.isolated(
        settings,
        ["data"],
        tmp_path,
        AISEMBLE_REPLICATION_FACTOR="3",
        AISEMBLE_PARTITIONS=str(PARTITIONS),
        AISEMBLE_PRODUCE_TIMEOUT_S=str(PRODUCE_TIMEOUT_S),
    )
    await asyncio.to_thread(pipeline.start, 120.0)
    try:
        await _run_fault(cluster, pipeline)
    finally:
        await asyncio.to_thread(pipeline.stop)


async def _run_fault(cluster: ClusterHandle, pipeline: Pipeline) -> None:
    topic = f"{pipeline.prefix}.data.requests"
    assert (await asyncio.to_thread(cluster.wait_in_sync, topic, 30.0)) >= 0
    records = [{"id": i, "value": float(i % 97)} for i in range(50)]
    ids = [f"c{i}-{uuid.uuid4().hex[:8]}" for i in range(TOTAL)]
    outcomes: dict[str, int | str] = {}  # request id -> HTTP status, or the exception's name (no answer)
    done_at: dict[str, float] = {}
    started_at: dict[str, float] = {}
    answered = asyncio.Event()
    kill: dict[str, float | int] = {}
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(client: httpx.AsyncClient, rid: str) -> None:
        async with gate:
            started_at[rid] = time.monotonic()
            try:
                response = await client.post(
                    "/data/process",
                    json={"operation": "analyze", "data": {"records": records}, "cache": False},
                    headers={"X-Request-Id": rid},
                )
                outcomes[rid] = response.status_code
                if response.status_code == 200:
                    body = response.json()
                    assert body["id"] == rid and body["ok"], body
            except httpx.HTTPError as exc:
                outcomes[rid] = type(exc).__name__
            done_at[rid] = time.monotonic()
            if sum(1 for s in outcomes.values() if s == 200) >= KILL_AFTER:
                answered.set()

    async def killer() -> None:
        await answered.wait()
        leader = await asyncio.to_thread(cluster.leader_of, topic, 0)
        kill["node"] = leader
        kill["at"] = time.monotonic()
        kill["in_flight"] = len(started_at) - len(done_at)
        await asyncio.to_thread(cluster.node(leader).kill)
        while time.monotonic() - kill["at"] < 60:  # when does partition 0 have another leader?
            now_leader = await asyncio.to_thread(cluster.leader_of, topic, 0, 5.0)
            if now_leader not in (leader, -1):
                kill["new_leader_s"] = time.monotonic() - kill["at"]
                kill["new_leader"] = now_leader
                return
            await asyncio.sleep(0.25)

    began = time.monotonic()
    async with httpx.AsyncClient(
        base_url=pipeline.url,
        timeout=HTTP_TIMEOUT_S,
        # Idle connections expire before uvicorn's 5 s keep-alive closes them, so the client never reuses
        # a connection the server is closing (an httpx ReadError that says nothing about the pipeline).
        limits=httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY, keepalive_expiry=2.0),
    ) as client:
        async with asyncio.timeout(150):
            kill_task = asyncio.create_task(killer())
            await asyncio.gather(*(one(client, rid) for rid in ids))
            await kill_task
    load_s = time.monotonic() - began

    exited = pipeline.exited()
    killed = int(kill["node"])
    restart_began = time.monotonic()
    await asyncio.to_thread(cluster.node(killed).start)
    restart_s = time.monotonic() - restart_began
    heal_s = await asyncio.to_thread(cluster.wait_in_sync, topic, 60.0)
    heal_total_s = time.monotonic() - restart_began

    reply_topic = edge_reply_topic(pipeline.prefix, pipeline.settings.edge_id)
    replies = await _reply_counts(cluster.bootstrap, reply_topic)

    statuses = Counter(outcomes.values())
    killed_at = kill["at"]
    after_kill_p0 = [
        done_at[rid] - killed_at
        for rid in ids
        if outcomes.get(rid) == 200 and started_at[rid] > killed_at and _partition_of(rid) == 0
    ]
    answers_after_kill = sorted(t for rid, t in done_at.items() if t > killed_at and outcomes[rid] == 200)
    gaps = [b - a for a, b in zip([killed_at, *answers_after_kill], answers_after_kill, strict=False)]
    counts = {
        "sent": TOTAL,
        "answered": statuses.get(200, 0),
        "deadline": statuses.get(504, 0),
        "errors": {str(k): v for k, v in statuses.items() if k not in (200, 504)},
        "no_http_answer": TOTAL - sum(1 for s in outcomes.values() if isinstance(s, int)),
        "lost": TOTAL - statuses.get(200, 0),  # a 504, a 503 or no answer: the caller has no result
        "duplicate_replies_dropped": sum(n - 1 for n in replies.values() if n > 1),
        "killed_node": killed,
        "new_leader": kill.get("new_leader"),
        "in_flight_at_kill": kill["in_flight"],
        "new_leader_s": round(float(kill.get("new_leader_s", -1)), 2),
        "failover_s": round(min(after_kill_p0), 2) if after_kill_p0 else None,
        "max_answer_gap_after_kill_s": round(max(gaps), 2) if gaps else None,
        "load_s": round(load_s, 2),
        "restart_s": round(restart_s, 2),
        "heal_s": round(heal_s, 2),
        "heal_total_s": round(heal_total_s, 2),
        "exited": exited,
    }
    print("FAULT-COUNTS: " + json.dumps(counts))

    assert len(outcomes) == TOTAL  # every request got exactly one outcome
    assert counts["in_flight_at_kill"] > 0, "the leader was killed between requests: nothing was in flight"
    assert counts["new_leader"] is not None, "partition 0 got no new leader within 60 s"
    assert not exited, {name: pipeline.log_tail(name) for name in exited}
    # The promise: every request is answered 200, through the failover. A 504 is a loss to its caller.
    assert counts["deadline"] == 0 and counts["no_http_answer"] == 0 and counts["errors"] == {}, counts
    assert counts["lost"] == 0 and counts["answered"] == TOTAL, counts
    assert set(ids) <= set(replies), f"{len(set(ids) - set(replies))} ids have no reply on the reply topic"
    assert set(replies) <= set(ids), "a reply for an id nobody sent"
