"""A local single-node Apache Kafka 4.x broker (KRaft, broker and controller in one JVM) on 127.0.0.1.

Use ``ensure_kafka(bootstrap)`` to get a broker at an address: it starts nothing when one already answers
there. ``start_kafka`` always starts one; ``stop_kafka(data_dir)`` stops one through its pid file (also
from another process, e.g. ``aisemble infra down``); ``kafka_status`` reports.

A data dir (default ``<cache_dir>/run/kafka-<port>``) holds::

    server.properties      rendered by ``broker_config``; rewritten on every start
    aisemble-kafka.json    cluster id and controller port chosen when the storage was formatted
    kraft/                 log.dirs: the metadata log and the topics' data (kept across restarts)
    logs/server.log        the broker's log4j2 log (size-rolled, see infra/log4j2.yaml)
    kafka.out              the JVM's stdout/stderr (warnings, JVM crashes)
    kafka.pid              while it runs
    .lock                  held by ensure_kafka while it starts one (concurrent callers take turns)
    cds/                   the JVM's class-data-sharing archive of the broker's classes (see below)

Start-up: the first start of a data dir with a given Java and Kafka writes a class-data-sharing archive of the
classes the broker loaded when it exits (``-XX:ArchiveClassesAtExit``, about 50 MB, a few seconds more at that
stop); later starts map it (``-XX:SharedArchiveFile``) instead of loading and verifying every class again,
which takes seconds off the broker's start. The archive is kept only from a clean stop; one the JVM cannot
use (another JVM build, other jars) is ignored by the JVM, which then starts as without one.

Guarantees: every listener binds 127.0.0.1 only; every internal topic has replication factor 1; storage
is formatted once (``kraft/meta.properties`` present means formatted) and reused after; a returned
handle's broker has answered a metadata request; a start that fails stops the JVM it started and raises
:class:`StartFailed` carrying the tail of the broker's log.

What can go wrong: no Java 17+ or Maven (:class:`ToolMissing`), the port or controller port taken
(:class:`PortInUse`), a data dir formatted for another controller port (:class:`InfraError`; use
another data dir), a broker that is still starting from another process (:class:`InfraError`,
retriable: it is not started twice), a broker that exits or does not answer in time
(:class:`StartFailed`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import signal
import subprocess
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from infra.addresses import local_kafka_port, parse_bootstrap
from infra.errors import InfraError, StartFailed
from infra.kafka_jars import fetch_jars, find_java, resolve_version
from infra.process import (
    cache_root,
    claim_pid_file,
    dir_lock,
    free_port,
    owned_pid,
    port_free,
    require_port_free,
    run_coroutine,
    spawn_detached,
    status_data_dir,
    stop_by_pid_file,
    stop_started,
    stopped_on_failure,
    tail,
    tcp_open,
    wait_until_ready,
)

log = logging.getLogger(__name__)

LOG4J_CONFIG = Path(__file__).with_name("log4j2.yaml")
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0
PID_FILE = "kafka.pid"
STATE_FILE = "aisemble-kafka.json"
MAIN_CLASS = "kafka.Kafka"

__all__ = [
    "KafkaHandle",
    "broker_config",
    "broker_ids",
    "cds_archive",
    "cds_options",
    "default_data_dir",
    "ensure_kafka",
    "fetch_jars",
    "format_storage",
    "java_command",
    "kafka_answers",
    "kafka_status",
    "new_cluster_id",
    "render_properties",
    "start_kafka",
    "stop_kafka",
]


def default_data_dir(port: int, cache_dir: str | Path | None = None) -> Path:
    """Where a broker on ``port`` keeps its state unless told otherwise: ``<cache_dir>/run/kafka-<port>``."""
    return cache_root(cache_dir) / "run" / f"kafka-{port}"


def broker_config(
    port: int, controller_port: int, log_dir: Path, extra: dict[str, str] | None = None
) -> dict[str, str]:
    """The server.properties of a single-node combined broker+controller on 127.0.0.1 (pure)."""
    config = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.bootstrap.servers": f"127.0.0.1:{controller_port}",
        "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(log_dir),
        "num.partitions": "4",
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        "auto.create.topics.enable": "false",  # topics come from aisemble's setup, never from a produce
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "10",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "10",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        "log.retention.hours": "24",
    }
    config.update(extra or {})
    return config


def render_properties(config: dict[str, str]) -> str:
    """A Java properties file for ``config`` (backslashes and line breaks escaped; pure)."""
    lines = ["# Written by aisemble infra/kafka.py; rewritten on every start."]
    for key, value in config.items():
        escaped = value.replace("\\", "\\\\").replace("\n", "\\n")
        lines.append(f"{key}={escaped}")
    return "\n".join(lines) + "\n"


def new_cluster_id() -> str:
    """A KRaft cluster id, as ``kafka-storage random-uuid`` makes one (22 chars of URL-safe base64)."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):  # Kafka's Uuid.randomUuid avoids ids that read as CLI flags
            return text


async def broker_ids(bootstrap: str, within_s: float, options: Mapping[str, Any] | None = None) -> list[int]:
    """The node ids of the live (unfenced) brokers that the cluster at ``bootstrap`` reports, within ``within_s``.

    ``options``: extra aiokafka client arguments (security: ``streams.kafka_security.client_options``).
    """
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        request_timeout_ms=max(1, int(within_s * 1000)),
        client_id="aisemble-infra",
        **(options or {}),
    )
    try:
        async with asyncio.timeout(within_s):
            await admin.start()
            cluster = await admin.describe_cluster()
    finally:
        await admin.close()
    return sorted(int(b["node_id"]) for b in cluster.get("brokers") or [])


def kafka_answers(bootstrap: str, timeout: float = 3.0, options: Mapping[str, Any] | None = None) -> bool:
    """True when a broker at ``bootstrap`` answers a metadata request (with at least one broker) in time.

    A TCP check comes first, so nothing is logged by aiokafka when no one listens. ``options``: extra
    aiokafka client arguments (a secured listener's protocol, SASL user, SSL context).
    """
    try:
        hosts = parse_bootstrap(bootstrap)
    except ValueError:
        return False
    if not any(tcp_open(host, port, timeout=min(timeout, 1.0)) for host, port in hosts):
        return False
    try:
        return len(run_coroutine(lambda: broker_ids(bootstrap, timeout, options))) > 0
    except (KafkaError, OSError, TimeoutError, asyncio.CancelledError) as exc:
        log.debug("no metadata from %s: %r", bootstrap, exc)
        return False


@dataclass
class KafkaHandle:
    """A broker this process started; ``stop()`` stops it (idempotent)."""

    bootstrap: str
    pid: int
    data_dir: Path
    log_file: Path
    _popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    cds: Path | None = None  # the class-data-sharing archive this broker writes at exit (None: none)

    @property
    def pid_file(self) -> Path:
        return self.data_dir / PID_FILE

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM, wait up to ``timeout`` s (a clean shutdown takes a few), SIGKILL; remove the pid file."""
        label = f"Kafka at {self.bootstrap}"
        killed = stop_started(
            self._popen, self.pid, self.pid_file, MAIN_CLASS, timeout=timeout, logger=log, label=label
        )
        if killed:
            log.warning("Kafka pid %d was killed after %.0f s", self.pid, timeout)
        if self.cds is not None:
            sigkilled = self._popen is not None and self._popen.returncode == -signal.SIGKILL  # by anyone
            settle_cds(self.cds.parent, clean=not killed and not sigkilled)
            self.cds = None


def _read_state(data_dir: Path) -> dict[str, str | int]:
    try:
        state = json.loads((data_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _recorded_controller_port(data_dir: Path) -> int | None:
    recorded = _read_state(data_dir).get("controller_port")
    if recorded is not None:
        return int(recorded)
    try:  # formatted by an older run or by hand: trust the server.properties it used
        text = (data_dir / "server.properties").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("controller.quorum.bootstrap.servers="):
            return int(line.rsplit(":", 1)[1])
    return None


def _choose_controller_port(port: int, asked: int | None, data_dir: Path, formatted: bool) -> int:
    recorded = _recorded_controller_port(data_dir) if formatted else None
    if asked is not None:
        if recorded is not None and int(recorded) != asked:
            raise InfraError(
                f"{data_dir} was formatted for controller port {recorded}, not {asked}: "
                f"use that port, or another data dir"
            )
        return asked
    if recorded is not None:
        return int(recorded)
    return port + 1 if port < 65535 and port_free(port + 1) else free_port()


def cds_archive(data_dir: Path, java: str, version: str | None) -> Path:
    """Where the broker's class-data-sharing archive for this Java and Kafka version lives in ``data_dir``."""
    binary = Path(java).resolve()
    try:
        stamp = f"{binary}:{binary.stat().st_mtime_ns}"
    except OSError:
        stamp = str(binary)
    key = hashlib.sha256(f"{stamp}:{resolve_version(version)}".encode()).hexdigest()[:12]
    return data_dir / "cds" / f"broker-{key}.jsa"


def cds_options(archive: Path) -> list[str]:
    """JVM options that use ``archive`` when it exists, else write ``<archive>.new`` when the JVM exits (kept by
    ``KafkaHandle.stop`` or ``stop_kafka`` after a clean stop: ``settle_cds``)."""
    if archive.is_file():
        return [f"-XX:SharedArchiveFile={archive}"]
    archive.parent.mkdir(parents=True, exist_ok=True)
    return [f"-XX:ArchiveClassesAtExit={archive.with_name(archive.name + '.new')}"]


def settle_cds(cds_dir: Path, *, clean: bool) -> None:
    """After a broker stopped: keep the archives it wrote at exit (``*.jsa.new`` -> ``*.jsa``) when it exited by
    itself (``clean``), drop them when it was killed (perhaps cut short)."""
    for written in cds_dir.glob("*.jsa.new"):
        if clean:
            written.replace(written.with_name(written.name.removesuffix(".new")))
        else:
            written.unlink(missing_ok=True)


def java_command(
    java: str, libs: Path, heap: str, data_dir: Path, main: list[str], extra: tuple[str, ...] = ()
) -> list[str]:
    """The JVM command line of a Kafka main class, logging to ``<data_dir>/logs`` through infra/log4j2.yaml;
    ``extra``: more JVM options (e.g. ``cds_options``)."""
    return [
        java, *extra, f"-Xmx{heap}", f"-Xms{heap}", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
        "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={LOG4J_CONFIG}", f"-Dkafka.logs.dir={data_dir / 'logs'}",
        "-cp", f"{libs}/*", *main,
    ]  # fmt: skip


def format_storage(
    java: str,
    libs: Path,
    data_dir: Path,
    props: Path,
    controller_port: int,
    *,
    cluster_id: str | None = None,
    flags: tuple[str, ...] = ("--standalone",),
) -> str:
    """Format the KRaft log dir named in ``props`` (``kafka-storage format``) and record the cluster id and
    controller port in ``<data_dir>/aisemble-kafka.json``; returns the cluster id (a new one unless given).

    ``flags``: ``--standalone`` for a single node with ``controller.quorum.bootstrap.servers``; none for a
    static quorum (``controller.quorum.voters``), where every voter is formatted with the same cluster id.
    """
    cluster_id = cluster_id or new_cluster_id()
    cmd = java_command(
        java, libs, "256m", data_dir,
        ["kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props), *flags],
    )  # fmt: skip
    log.info("formatting KRaft storage in %s (cluster id %s)", data_dir / "kraft", cluster_id)
    try:
        out = subprocess.run(cmd, cwd=data_dir, capture_output=True, text=True, timeout=120, check=False)
    except subprocess.TimeoutExpired as exc:
        raise StartFailed("kafka-storage format did not finish within 120 s") from exc
    if out.returncode != 0:
        raise StartFailed(f"kafka-storage format failed (exit {out.returncode})", (out.stdout + out.stderr)[-4000:])
    state = {"cluster_id": cluster_id, "controller_port": controller_port}
    (data_dir / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
    return cluster_id


def start_kafka(
    port: int = 9092,
    controller_port: int | None = None,
    data_dir: str | Path | None = None,
    heap: str = "512m",
    *,
    version: str | None = None,
    cache_dir: str | Path | None = None,
    timeout: float = START_TIMEOUT_S,
    extra_config: dict[str, str] | None = None,
    format_flags: tuple[str, ...] = (),
    client_options: Mapping[str, Any] | None = None,
) -> KafkaHandle:
    """Start a broker on ``127.0.0.1:port`` and return once it answers a metadata request.

    Args:
        port: the PLAINTEXT listener (clients' bootstrap).
        controller_port: the CONTROLLER listener; default: the one recorded when ``data_dir`` was
            formatted, else ``port + 1`` when free, else any free port.
        data_dir: state, logs and pid file; default ``<cache_dir>/run/kafka-<port>``. Pass a fresh
            temporary folder for a broker with no topics.
        heap: the JVM's ``-Xmx``/``-Xms``.
        version: Kafka version (default ``$AISEMBLE_KAFKA_VERSION`` or 4.1.1).
        cache_dir: jar cache root (default ``$AISEMBLE_CACHE_DIR`` or ``~/.cache/aisemble``).
        timeout: seconds to wait for the first metadata answer.
        extra_config: server.properties entries that override the defaults (e.g. a SASL_SSL listener:
            ``infra.secure.sasl_ssl_config``).
        format_flags: extra ``kafka-storage format`` flags for a fresh data dir (SCRAM users:
            ``infra.secure.scram_flags``).
        client_options: aiokafka client arguments for the readiness check (a secured client listener).

    Raises:
        ToolMissing, PortInUse, StartFailed, InfraError: see the module docstring.
    """
    data = Path(data_dir) if data_dir is not None else default_data_dir(port, cache_dir)
    data.mkdir(parents=True, exist_ok=True)
    bootstrap = f"127.0.0.1:{port}"
    pid_file = data / PID_FILE
    claim_pid_file(
        pid_file,
        MAIN_CLASS,
        lambda running: InfraError(
            f"a broker from {data} already runs (pid {running}) and does not answer at {bootstrap}: "
            f"wait for it, or stop it (aisemble infra down)",
            retriable=True,
        ),
    )
    require_port_free(port, "Kafka broker")
    kraft = data / "kraft"
    formatted = (kraft / "meta.properties").is_file()
    ctrl = _choose_controller_port(port, controller_port, data, formatted)
    require_port_free(ctrl, "Kafka controller", "pass another controller_port (and a fresh data dir)")

    java = find_java()
    libs = fetch_jars(version, cache_dir)
    props = data / "server.properties"
    props.write_text(render_properties(broker_config(port, ctrl, kraft, extra_config)))
    if not formatted:
        format_storage(java, libs, data, props, ctrl, flags=("--standalone", *format_flags))

    out_file = data / "kafka.out"
    log_file = data / "logs" / "server.log"
    archive = cds_archive(data, java, version)
    writes_cds = not archive.is_file()
    cmd = java_command(java, libs, heap, data, [MAIN_CLASS, str(props)], tuple(cds_options(archive)))
    log.info("starting Kafka %s at %s (data %s)", resolve_version(version), bootstrap, data)
    started = time.monotonic()
    popen = spawn_detached(cmd, cwd=data, out_path=out_file, pid_file=pid_file)
    handle = KafkaHandle(
        bootstrap=bootstrap,
        pid=popen.pid,
        data_dir=data,
        log_file=log_file,
        _popen=popen,
        cds=archive if writes_cds else None,
    )
    with stopped_on_failure(lambda: handle.stop(timeout=10.0)):
        wait_until_ready(
            popen,
            lambda remaining: (
                tcp_open("127.0.0.1", port, timeout=0.5)
                and kafka_answers(bootstrap, timeout=max(0.5, min(5.0, remaining)), options=client_options)
            ),
            timeout=timeout,
            interval=0.25,
            exited=lambda status: f"Kafka exited with status {status} while starting",
            timed_out=f"Kafka did not answer at {bootstrap} within {timeout:g} s",
            log_tail=lambda: _log_tail(handle),
        )
    log.info("Kafka answers at %s after %.1f s (pid %d)", bootstrap, time.monotonic() - started, popen.pid)
    return handle


def _log_tail(handle: KafkaHandle) -> str:
    parts = [tail(handle.log_file, 30), tail(handle.data_dir / "kafka.out", 15)]
    return "\n".join(p for p in parts if p)


def ensure_kafka(
    bootstrap: str,
    *,
    data_dir: str | Path | None = None,
    controller_port: int | None = None,
    heap: str = "512m",
    version: str | None = None,
    cache_dir: str | Path | None = None,
    timeout: float = START_TIMEOUT_S,
    client_options: Mapping[str, Any] | None = None,
) -> KafkaHandle | None:
    """A broker at ``bootstrap``: None when one already answers there, else the handle of a started one.

    Only starts a broker for a ``127.0.0.1``/``localhost`` address (its first entry's port).
    ``client_options``: aiokafka arguments for asking a secured broker (the one it starts is PLAINTEXT).

    Raises:
        NotLoopback: nothing answers and the address is not local.
        ToolMissing, PortInUse, StartFailed, InfraError: from ``start_kafka``.
    """
    if kafka_answers(bootstrap, options=client_options):
        log.info("Kafka already answers at %s; starting none", bootstrap)
        return None
    port = local_kafka_port(bootstrap)
    data = Path(data_dir) if data_dir is not None else default_data_dir(port, cache_dir)
    with dir_lock(data):  # a second process ensuring the same broker waits here, then finds it
        if kafka_answers(bootstrap, options=client_options):
            log.info("Kafka answers at %s (started by another process); starting none", bootstrap)
            return None
        return start_kafka(
            port,
            controller_port,
            data,
            heap,
            version=version,
            cache_dir=cache_dir,
            timeout=timeout,
        )


def stop_kafka(data_dir: str | Path, timeout: float = STOP_TIMEOUT_S) -> bool:
    """Stop the broker whose pid file is in ``data_dir`` (from any process). True when one was running."""
    started = time.monotonic()
    stopped = stop_by_pid_file(Path(data_dir) / PID_FILE, MAIN_CLASS, timeout=timeout)
    if stopped:  # a SIGKILL comes only once ``timeout`` has passed: sooner, it exited by itself
        settle_cds(Path(data_dir) / "cds", clean=time.monotonic() - started < timeout)
    return stopped


def kafka_status(
    bootstrap: str,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    client_options: Mapping[str, Any] | None = None,
) -> dict[str, str | int | bool | None]:
    """``{"bootstrap", "answers", "pid", "data_dir", "log"}``; pid is that of a broker infra started.

    ``data_dir`` defaults to the default one for the bootstrap's port (when that port is local);
    ``client_options`` are the aiokafka security arguments for asking a secured broker.
    """
    data = status_data_dir(data_dir, lambda: default_data_dir(local_kafka_port(bootstrap), cache_dir))
    pid = owned_pid(data / PID_FILE, MAIN_CLASS) if data is not None else None
    return {
        "bootstrap": bootstrap,
        "answers": kafka_answers(bootstrap, options=client_options),
        "pid": pid,
        "data_dir": str(data) if data is not None else None,
        "log": str(data / "logs" / "server.log") if data is not None else None,
    }
