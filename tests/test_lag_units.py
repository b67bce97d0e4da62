"""Lag arithmetic (streams/lag.py) with hand-made snapshots and an injected clock: no Kafka."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streams.lag import GroupSample, Snapshot, compute, drain_text, drain_time, partition_lag, rate

TOPIC = "p.data.requests"


def snap(t: float, committed: dict[int, int], ends: dict[int, int], starts: dict[int, int] | None = None,
         state: str = "Stable", members: int = 1) -> Snapshot:
    group = GroupSample(
        group="p-data-agents",
        state=state,
        members=members,
        topics=(TOPIC,),
        committed={(TOPIC, p): o for p, o in committed.items()},
        service="data",
    )
    return Snapshot(
        taken_at=t,
        wall_time=1000.0 + t,
        groups=(group,),
        ends={(TOPIC, p): o for p, o in ends.items()},
        starts={(TOPIC, p): o for p, o in (starts or {}).items()},
    )


def test_partition_lag_counts_from_commit_else_log_start() -> None:
    assert partition_lag(40, 0, 100) == 60
    assert partition_lag(None, 0, 0) == 0  # empty partition, no commit
    assert partition_lag(None, 30, 100) == 70  # no commit: from the log start, not from 0
    assert partition_lag(10, 30, 100) == 70  # commit below the log start (retention): from the log start
    assert partition_lag(100, 0, 100) == 0
    assert partition_lag(120, 0, 100) == 0  # never negative


def test_rate_and_drain() -> None:
    assert rate(100, 150, 2.0) == 25.0
    assert rate(None, 150, 2.0) is None  # no previous commit
    assert rate(100, None, 2.0) is None
    assert rate(100, 150, None) is None  # first sample
    assert rate(100, 150, 0.0) is None
    assert rate(150, 100, 1.0) is None  # offset reset backwards
    assert drain_time(0, None) == 0.0
    assert drain_time(100, 25.0) == 4.0
    assert drain_time(100, 0.0) is None
    assert drain_time(100, None) is None
    assert drain_text(0, 0.0) == "drained"
    assert drain_text(5, None) == "not draining"
    assert drain_text(100, 4.0) == "4.0 s"


def test_first_sample_has_lag_but_no_rate() -> None:
    report = compute(snap(0.0, {0: 10, 1: 20}, {0: 50, 1: 20, 2: 0, 3: 7}))
    group = report.group("p-data-agents")
    assert group is not None
    assert report.interval_s is None
    # partitions 2 and 3 were never committed: 2 is empty (0), 3 counts from its log start (0) -> 7
    assert [p.lag for p in group.partitions] == [40, 0, 0, 7]
    assert [p.partition for p in group.partitions] == [0, 1, 2, 3]
    assert group.lag == 47
    assert group.total.rate_per_s is None
    assert group.total.drain_s is None


def test_two_samples_give_rate_and_drain_time() -> None:
    before = snap(10.0, {0: 10, 1: 20}, {0: 110, 1: 20})
    after = snap(12.0, {0: 30, 1: 20}, {0: 110, 1: 20})
    group = compute(after, before).groups[0]
    p0, p1 = group.partitions
    assert p0.rate_per_s == 10.0 and p0.lag == 80 and p0.drain_s == 8.0
    assert p1.rate_per_s == 0.0 and p1.lag == 0 and p1.drain_s == 0.0
    assert group.total.rate_per_s == 10.0
    assert group.total.drain_s == 8.0
    assert group.topics[TOPIC].lag == 80
    by_service = compute(after, before).services["data"]
    assert (by_service.lag, by_service.rate_per_s, by_service.drain_s) == (80, 10.0, 8.0)


def test_paused_group_is_not_draining() -> None:
    before = snap(0.0, {0: 10}, {0: 100})
    after = snap(1.0, {0: 10}, {0: 500})
    group = compute(after, before).groups[0]
    assert group.lag == 490
    assert group.total.rate_per_s == 0.0
    assert group.total.drain_s is None
    assert group.as_dict()["drain"] == "not draining"


def test_group_without_members_or_commits_is_reported() -> None:
    empty = compute(snap(0.0, {}, {0: 5, 1: 0}, starts={0: 2}, state="Empty", members=0)).groups[0]
    assert empty.state == "Empty" and empty.members == 0
    assert empty.lag == 3
    assert [p.committed for p in empty.partitions] == [None, None]


def test_a_first_commit_counts_from_the_log_start() -> None:
    before = snap(0.0, {}, {0: 100}, starts={0: 10})
    after = snap(2.0, {0: 40}, {0: 100}, starts={0: 10})
    (partition,) = compute(after, before).groups[0].partitions
    assert partition.rate_per_s == 15.0 and partition.lag == 60 and partition.drain_s == 4.0


def test_a_partition_or_group_missing_from_the_previous_sample_has_no_rate() -> None:
    before = snap(0.0, {0: 5}, {0: 100})
    after = snap(1.0, {0: 10, 1: 3}, {0: 100, 1: 10})
    p0, p1 = compute(after, before).groups[0].partitions
    assert p0.rate_per_s == 5.0 and p1.rate_per_s is None
    renamed = Snapshot(0.0, 0.0, (), before.ends, before.starts)
    assert compute(after, renamed).groups[0].total.rate_per_s is None


def test_no_commit_in_either_sample_is_rate_zero() -> None:
    before = snap(0.0, {}, {0: 0, 1: 0})
    after = snap(2.0, {}, {0: 300, 1: 0})
    group = compute(after, before).groups[0]
    assert [p.rate_per_s for p in group.partitions] == [0.0, 0.0]
    assert group.lag == 300 and group.total.rate_per_s == 0.0 and group.total.drain_s is None


def test_as_dict_is_json() -> None:
    report = compute(snap(1.5, {0: 3}, {0: 9}), snap(0.5, {0: 1}, {0: 9}))
    document = json.loads(json.dumps(report.as_dict()))
    (group,) = document["groups"]
    assert document["interval_s"] == pytest.approx(1.0)
    assert group["lag"] == 6 and group["rate_per_s"] == 2.0 and group["drain_s"] == 3.0
    assert group["partitions"][0] == {
        "topic": TOPIC, "partition": 0, "committed": 3, "start": 0, "end": 9, "lag": 6,
        "rate_per_s": 2.0, "drain_s": 3.0, "drain": "3.0 s",
    }
    assert group["topics"][TOPIC]["lag"] == 6


def test_keda_example_scales_on_the_names_aisemble_uses() -> None:
    """infra/keda-scaledobject.example.yaml: the group and topic the agents really use; no more replicas than
    partitions (the extra ones would get no partition)."""
    import yaml

    from streams.settings import Settings
    from streams.topics import consumer_group, service_topics

    path = Path(__file__).parents[1] / "infra" / "keda-scaledobject.example.yaml"
    manifest = yaml.safe_load(path.read_text())
    assert manifest["apiVersion"] == "keda.sh/v1alpha1" and manifest["kind"] == "ScaledObject"
    spec = manifest["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "aisemble-agent-nlp"}
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "kafka"
    defaults = Settings()
    assert trigger["metadata"]["consumerGroup"] == consumer_group(defaults.topic_prefix, "nlp")
    assert trigger["metadata"]["topic"] == service_topics(defaults.topic_prefix, "nlp").requests
    assert trigger["metadata"]["bootstrapServers"]
    assert int(trigger["metadata"]["lagThreshold"]) > 0
    assert spec["minReplicaCount"] == 1
    assert spec["minReplicaCount"] <= spec["maxReplicaCount"] <= defaults.partitions
    assert all(isinstance(v, str) for v in trigger["metadata"].values())  # KEDA's metadata is a string map


def test_lag_route_needs_a_key_like_metrics() -> None:
    """/lag is operational data: behind the API key unless AISEMBLE_METRICS_REQUIRE_KEY=false (no Kafka here:
    no lifespan, so a request the gate lets through fails for want of a monitor, 500)."""
    from fastapi.testclient import TestClient
    from pydantic import SecretStr

    from api.app import create_app
    from streams.settings import Settings

    keyed = Settings(api_keys=[SecretStr("k" * 24)])
    client = TestClient(create_app(keyed), raise_server_exceptions=False)
    assert client.get("/lag").status_code == 401
    assert client.get("/lag", headers={"X-API-Key": "k" * 24}).status_code == 500
    client = TestClient(create_app(keyed.model_copy(update={"metrics_require_key": False})),
                        raise_server_exceptions=False)
    assert client.get("/lag").status_code == 500
