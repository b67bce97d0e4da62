"""Start-up: what makes a warm ``aisemble run`` healthy sooner, each held by a test.

* The agents start beside the broker: an agent whose broker does not answer yet waits for it (bounded) and
  makes its topics once it answers, instead of exiting (``agents.worker.ensure_topics_when_up``).
* Faust's table manager no longer sleeps a second before the consumer subscribes (``TablelessManager``).
* An agent's first heartbeat goes out once the group has assigned it its partitions, not one interval after.
* The broker maps a class-data-sharing archive written by its first clean stop (``infra.kafka``).
* The whole pipeline (Kafka, Redis, every agent, the edge) reaches healthy within a generous bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from aiokafka.errors import KafkaConnectionError

from agents.worker import ensure_topics_when_up
from aisemble.pipeline import Pipeline, free_port, throwaway_prefix
from infra.kafka import KafkaHandle, cds_archive, cds_options, stop_kafka
from streams.app import TablelessManager, create_app
from streams.settings import Settings
from streams.topics import partitions_of, service_topics

# A warm start of the whole pipeline: about 65 s (bench/startup.py, median of 3) and 91 s (this test) on a shared
# 2-core machine at a load average of 13 to 15, where 28 CPU-s of start-up work compete with other jobs; the
# bound is a few times that, for shared CI machines. AISEMBLE_STARTUP_BOUND_S overrides it.
STARTUP_BOUND_S = float(os.environ.get("AISEMBLE_STARTUP_BOUND_S", "240"))


async def _forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def late_proxy(port: int, target: tuple[str, int], after_s: float) -> AsyncIterator[None]:
    """A TCP forwarder on 127.0.0.1:``port`` to ``target`` that starts listening only ``after_s`` seconds in."""

    async def serve_pair(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*target)
        await asyncio.gather(_forward(reader, up_writer), _forward(up_reader, writer))

    servers: list[asyncio.Server] = []

    async def open_later() -> None:
        await asyncio.sleep(after_s)
        servers.append(await asyncio.start_server(serve_pair, "127.0.0.1", port))

    opener = asyncio.create_task(open_later())
    try:
        yield
    finally:
        opener.cancel()
        for server in servers:
            server.close()


@pytest.mark.integration
async def test_an_agent_waits_for_a_broker_that_is_not_up_yet_then_makes_its_topics(infra_settings: Settings) -> None:
    host, port = infra_settings.kafka_bootstrap.split(",")[0].rsplit(":", 1)
    late = free_port()
    prefix = throwaway_prefix()
    settings = infra_settings.model_copy(update={"kafka_bootstrap": f"127.0.0.1:{late}", "topic_prefix": prefix})
    started = time.monotonic()
    async with late_proxy(late, (host, int(port)), after_s=2.0):
        await ensure_topics_when_up(settings, "data", wait_s=60, retry_s=0.2)
    waited = time.monotonic() - started
    assert waited >= 2.0, "returned before anything listened: the broker was not waited for"
    partitions = await partitions_of(infra_settings, service_topics(prefix, "data").requests)
    assert len(partitions) == infra_settings.partitions


@pytest.mark.integration
async def test_the_wait_for_a_broker_is_bounded(infra_settings: Settings) -> None:
    settings = infra_settings.model_copy(update={"kafka_bootstrap": f"127.0.0.1:{free_port()}"})
    started = time.monotonic()
    with pytest.raises(KafkaConnectionError):
        await ensure_topics_when_up(settings, "data", wait_s=1.5, retry_s=0.2)
    assert 1.0 <= time.monotonic() - started < 30


class _Recovery:
    started = False

    async def start(self) -> None:
        self.started = True


async def test_the_agents_table_manager_starts_without_fausts_one_second_sleep(infra_settings: Settings) -> None:
    app = create_app(infra_settings.model_copy(update={"topic_prefix": throwaway_prefix()}), "data")
    manager = app.tables
    assert isinstance(manager, TablelessManager)
    recovery = _Recovery()
    channels: list[bool] = []

    async def update_channels() -> None:
        channels.append(True)

    # Faust's Recovery and the tables' channels need a running consumer: stand-ins that record being reached.
    manager._recovery = recovery  # type: ignore[assignment]
    manager._update_channels = update_channels  # type: ignore[method-assign]
    started = time.monotonic()
    await manager.on_start()
    assert recovery.started and channels == [True]
    assert time.monotonic() - started < 0.5, "the table manager still sleeps before the consumer subscribes"


def _stamp(line: str) -> float | None:
    match = re.match(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ", line)
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() if match else None


@pytest.mark.integration
def test_an_agent_is_live_in_health_once_its_partitions_are_assigned_not_an_interval_later(
    infra_settings: Settings, tmp_path: Path
) -> None:
    # A long heartbeat interval: the old first beat came one interval after the app started.
    prefix = throwaway_prefix()
    settings = infra_settings.model_copy(
        update={"topic_prefix": prefix, "edge_id": f"{prefix}-edge", "edge_port": free_port()}
    )
    pipeline = Pipeline(
        settings, ["data"], tmp_path, AISEMBLE_HEARTBEAT_INTERVAL_S="60", AISEMBLE_HEARTBEAT_TTL_S="180"
    )
    try:
        pipeline.spawn_agents()
        pipeline.spawn_edge()
        pipeline.wait_healthy(timeout_s=240)
        live_at = time.time()
        lines = pipeline.log_tail("data", chars=200_000).splitlines()
        ready = next(_stamp(line) for line in lines if "Worker ready" in line)
        assert ready is not None
        # AISEMBLE_EVENT_LOOP's default (auto) puts the agent and the edge on uvloop (streams.event_loop).
        assert any("startup data: event loop uvloop.Loop" in line for line in lines)
        assert "event loop uvloop.Loop" in pipeline.log_tail("edge", chars=200_000)
        # Healthy within seconds of the assignment (the poll, one Redis write and read), far below the interval.
        assert live_at - ready < 20, f"live {live_at - ready:.1f}s after the assignment"
    finally:
        pipeline.stop()


@pytest.mark.integration
@pytest.mark.slow
def test_a_warm_aisemble_run_is_healthy_within_the_bound_and_ctrl_c_stops_every_process(
    infra_settings: Settings, tmp_path: Path
) -> None:
    prefix = throwaway_prefix()
    port = free_port()
    env = {
        **os.environ,
        "AISEMBLE_KAFKA_BOOTSTRAP": infra_settings.kafka_bootstrap,
        "AISEMBLE_REDIS_URL": infra_settings.redis_url,
        "AISEMBLE_TOPIC_PREFIX": prefix,
        "AISEMBLE_EDGE_ID": f"{prefix}-edge",
        "AISEMBLE_EDGE_HOST": "127.0.0.1",
        "AISEMBLE_EDGE_PORT": str(port),
        "AISEMBLE_RUN_LOG_DIR": str(tmp_path),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    env.pop("AISEMBLE_SERVICES", None)  # every service
    env.pop("AISEMBLE_API_KEYS", None)
    with (tmp_path / "run.log").open("wb") as out:
        run = subprocess.Popen([sys.executable, "-m", "aisemble", "run"], env=env, stdout=out, stderr=subprocess.STDOUT)
    started = time.monotonic()
    healthy_after: float | None = None
    pids: list[int] = []
    try:
        while time.monotonic() - started < STARTUP_BOUND_S and run.poll() is None:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                response = httpx.get(f"http://127.0.0.1:{port}/health", timeout=3)
                body = response.json()
                if response.status_code == 200 and body.get("status") == "ok":
                    healthy_after = time.monotonic() - started
                    pids = [a["pid"] for view in body["services"].values() for a in view["agents"]]
                    break
            time.sleep(0.2)
    finally:
        run.send_signal(signal.SIGINT)
        status = run.wait(timeout=90)
    log = (tmp_path / "run.log").read_text(errors="replace")
    assert healthy_after is not None, f"not healthy within {STARTUP_BOUND_S:.0f}s:\n{log[-3000:]}"
    print("STARTUP:", json.dumps({"healthy_after_s": round(healthy_after, 1), "bound_s": STARTUP_BOUND_S}))
    assert len(pids) == 4, "one live agent per service"
    assert status == 0
    for pid in pids:  # every agent stopped with it
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()


def test_the_broker_writes_a_class_archive_first_and_maps_it_after(tmp_path: Path) -> None:
    archive = cds_archive(tmp_path, sys.executable, "4.1.1")
    assert archive.parent == tmp_path / "cds"
    assert cds_options(archive) == [f"-XX:ArchiveClassesAtExit={archive}.new"]
    archive.write_bytes(b"archive")
    assert cds_options(archive) == [f"-XX:SharedArchiveFile={archive}"]
    assert cds_archive(tmp_path, sys.executable, "4.2.0") != archive, "another Kafka version, another archive"


def _handle(tmp_path: Path, code: str, archive: Path) -> KafkaHandle:
    popen = subprocess.Popen([sys.executable, "-c", code])
    time.sleep(0.5)  # its signal handling is in place
    return KafkaHandle("127.0.0.1:1", popen.pid, tmp_path, tmp_path / "server.log", popen, cds=archive)


def test_the_class_archive_is_kept_after_a_clean_stop_and_dropped_after_a_kill(tmp_path: Path) -> None:
    archive = tmp_path / "cds" / "broker-x.jsa"
    archive.parent.mkdir()
    written = archive.with_name(archive.name + ".new")
    written.write_bytes(b"complete")
    _handle(tmp_path, "import time; time.sleep(60)", archive).stop(timeout=20)  # SIGTERM ends it
    assert archive.read_bytes() == b"complete" and not written.exists()

    archive.unlink()
    written.write_bytes(b"perhaps cut short")
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    _handle(tmp_path, stubborn, archive).stop(timeout=1)  # SIGKILLed
    assert not archive.exists() and not written.exists()

    written.write_bytes(b"perhaps cut short")
    handle = _handle(tmp_path, "import time; time.sleep(60)", archive)
    os.kill(handle.pid, signal.SIGKILL)  # killed by someone else (test_broker_outage does this) before the stop
    handle.stop(timeout=20)
    assert not archive.exists() and not written.exists()


def test_a_broker_stopped_through_its_pid_file_keeps_its_class_archive(tmp_path: Path) -> None:
    # ``aisemble infra down`` stops the broker ``infra up`` started, from another process.
    written = tmp_path / "cds" / "broker-x.jsa.new"
    written.parent.mkdir()
    written.write_bytes(b"complete")
    broker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "kafka.Kafka"])
    try:
        (tmp_path / "kafka.pid").write_text(f"{broker.pid}\n")
        time.sleep(0.5)
        assert stop_kafka(tmp_path, timeout=20)
    finally:
        broker.kill()
        broker.wait()
    assert (tmp_path / "cds" / "broker-x.jsa").read_bytes() == b"complete" and not written.exists()
