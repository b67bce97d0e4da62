"""The pipeline floor: a no-op task through edge, Kafka, agent and back, and a bare Kafka round trip beside it.

    python bench/floor.py [--rate 200] [--count 2000] [--clients 64] [--duration 10]

The data agent serves ``bench.noop_runner:build`` (each output is its input), so what is measured is the
pipeline alone. Two loads on ``POST /data/process``:

* open loop: ``count`` requests sent at a fixed ``rate`` (request i leaves at start + i/rate whatever the
  earlier ones are doing), so a slow answer cannot slow the sender down and hide itself;
* saturation: ``clients`` closed-loop clients for ``duration`` seconds.

For each: client round trip p50/p99 and where the time goes, per request, from the reply's ``timings_ms``
and the client's clock: ``http`` = round trip - edge_ms (HTTP, JSON, the ASGI stack, the client itself),
``to_agent`` = queue_ms (the request record's timestamp, taken when the edge's producer builds it, to the
agent picking it up: produce, broker, fetch, the agent's buffer), ``agent`` = total_ms (picked up to reply
produced), ``back`` = edge_ms - queue_ms - total_ms (the edge's own work before producing, the reply's
produce/fetch and routing it to the waiting request). ``queue_ms`` compares two clocks of the same machine.

Beside it, ``bare_kafka``: ``n`` sequential produce-then-consume round trips of a 100-byte record with plain
aiokafka clients (producer configured as the edge's: acks=all, idempotent, linger 1 ms; consumer assigned,
fetch_max_wait 100 ms) on the same broker: the least any Kafka round trip costs here.

What can go wrong: non-200 answers are counted (``statuses``), never hidden; a request still unanswered
120 s after it was sent counts as an error. Everything started is stopped by PID; the bare round-trip
topic is deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from bench.common import base_settings, running_pipeline, summary_ms, write_result
from streams.kafka_security import client_options
from streams.settings import Settings
from streams.topics import ensure_topics, reply_topic_name, wait_for_partitions

NOOP = "bench.noop_runner:build"
PATH = "/data/process"
HOPS = ("http", "to_agent", "agent", "back")
FLOOR_RATE_DEFAULT = 200.0
WARM_CONNECTIONS = 16


def noop_body(i: int) -> dict[str, object]:
    return {"operation": "analyze", "data": {"records": [{"id": i, "value": i}]}, "cache": False}


class Samples:
    """Round trips and their per-hop split, and status counts."""

    def __init__(self) -> None:
        self.rtt: list[float] = []
        self.hops: dict[str, list[float]] = {h: [] for h in HOPS}
        self.statuses: Counter[int] = Counter()

    def add(self, rtt_ms: float, status: int, body: dict[str, Any] | None) -> None:
        self.statuses[status] += 1
        if status != 200 or body is None:
            return
        self.rtt.append(rtt_ms)
        t = body.get("timings_ms") or {}
        edge, queue, total = float(t.get("edge_ms", 0)), float(t.get("queue_ms", 0)), float(t.get("total_ms", 0))
        for hop, ms in zip(HOPS, (rtt_ms - edge, queue, total, edge - queue - total), strict=True):
            self.hops[hop].append(ms)

    def result(self, seconds: float) -> dict[str, object]:
        ok = self.statuses.get(200, 0)
        hop_p50 = {h: summary_ms(v)["p50"] for h, v in self.hops.items()}
        mean = {h: sum(v) / len(v) if v else 0.0 for h, v in self.hops.items()}
        whole = sum(mean.values()) or 1.0
        return {
            "answered_200": ok,
            "errors": sum(self.statuses.values()) - ok,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "seconds": round(seconds, 3),
            "items_per_s": round(ok / seconds, 2) if seconds else 0.0,
            "latency_ms": summary_ms(self.rtt),
            "hops_ms": {h: summary_ms(v) for h, v in self.hops.items()},
            "hops_p50_ms": hop_p50,
            "hop_share_of_mean": {h: round(mean[h] / whole, 3) for h in HOPS},
        }


async def _post(http: httpx.AsyncClient, i: int, samples: Samples) -> None:
    t0 = time.perf_counter()
    try:
        response = await http.post(PATH, json=noop_body(i))
    except httpx.HTTPError:
        samples.add(0.0, -1, None)
        return
    rtt = (time.perf_counter() - t0) * 1000
    samples.add(rtt, response.status_code, response.json() if response.status_code == 200 else None)


def _client(url: str, connections: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=url, timeout=120, limits=limits)


async def open_loop(url: str, rate: float, count: int) -> dict[str, object]:
    """``count`` requests, request i sent at start + i/rate (not waiting for earlier answers)."""
    samples = Samples()
    async with _client(url, 512) as http:
        for i in range(5):  # warm the path
            await _post(http, -i - 1, Samples())
        # open WARM_CONNECTIONS connections up front, so the rate's first overlaps do not pay TCP set-up
        await asyncio.gather(*(_post(http, -10 - i, Samples()) for i in range(WARM_CONNECTIONS)))
        loop = asyncio.get_running_loop()
        start = loop.time()
        tasks = []
        late = 0.0
        for i in range(count):
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                late = max(late, -delay)
            tasks.append(asyncio.create_task(_post(http, i, samples)))
        await asyncio.gather(*tasks)
        elapsed = loop.time() - start
    out = samples.result(elapsed)
    out.update({"rate_per_s": rate, "requests": count, "sender_max_late_ms": round(late * 1000, 3)})
    return out


async def saturation(url: str, clients: int, duration_s: float) -> dict[str, object]:
    """``clients`` closed-loop clients for ``duration_s``."""
    samples = Samples()
    counter = itertools.count()
    async with _client(url, clients + 8) as http:
        for i in range(5):
            await _post(http, -i - 1, Samples())
        end = time.perf_counter() + duration_s

        async def client() -> None:
            while time.perf_counter() < end:
                await _post(http, next(counter), samples)

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    out = samples.result(elapsed)
    out["clients"] = clients
    return out


async def bare_kafka(settings: Settings, n: int, linger_ms: int = 1) -> dict[str, object]:
    """``n`` sequential produce -> consume round trips of a 100-byte record on a fresh 1-partition topic
    (``linger_ms``: the producer's)."""
    topic = reply_topic_name(settings.topic_prefix, f"bench-bare-{uuid.uuid4().hex[:8]}")
    await ensure_topics(settings, [(topic, 1)])
    options = client_options(settings)
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=True, linger_ms=linger_ms, **options
    )
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False, fetch_max_wait_ms=100, **options
    )
    latencies: list[float] = []
    lost = 0
    await producer.start()
    await consumer.start()
    try:
        partitions = await wait_for_partitions(settings, topic)
        tp = TopicPartition(topic, partitions[0])
        consumer.assign([tp])
        await consumer.seek_to_end(tp)
        await consumer.position(tp)
        payload = b"x" * 100
        for i in range(n + 5):  # the first 5 warm the connections and are not counted
            t0 = time.perf_counter()
            await producer.send_and_wait(topic, payload, key=str(i).encode())
            got = False
            deadline = t0 + 10
            while not got and time.perf_counter() < deadline:
                batch = await consumer.getmany(tp, timeout_ms=1000)
                got = bool(batch.get(tp))
            if i >= 5:
                if got:
                    latencies.append((time.perf_counter() - t0) * 1000)
                else:
                    lost += 1
    finally:
        await consumer.stop()
        await producer.stop()
        with contextlib.suppress(Exception):
            admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, **options)
            await admin.start()
            try:
                await admin.delete_topics([topic])
            finally:
                await admin.close()
    return {"round_trips": n, "linger_ms": linger_ms, "not_back_in_10s": lost, "latency_ms": summary_ms(latencies)}


def run_floor(rate: float, count: int, clients: int, duration_s: float, bare_n: int) -> dict[str, object]:
    """Both loads through a pipeline whose data agent is the no-op runner, then the bare Kafka round trips."""
    out: dict[str, object] = {"runner": NOOP}
    with running_pipeline(["data"], runners={"data": NOOP}) as pipeline:
        out["open_loop"] = asyncio.run(open_loop(pipeline.url, rate, count))
        out["saturation"] = asyncio.run(saturation(pipeline.url, clients, duration_s))
    out["bare_kafka"] = asyncio.run(bare_kafka(base_settings(), bare_n))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=FLOOR_RATE_DEFAULT)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--bare", type=int, default=500, help="bare aiokafka round trips")
    args = parser.parse_args()
    result = run_floor(args.rate, args.count, args.clients, args.duration, args.bare)
    print(result)
    print(write_result("floor", result))


if __name__ == "__main__":
    main()
