"""A local 3-node Apache Kafka 4.x KRaft cluster on 127.0.0.1: three combined broker+controller JVMs.

``start_cluster(base_port, data_dir)`` starts it and returns a :class:`ClusterHandle` once every node is a
live broker; ``stop_cluster(data_dir)`` stops it through its pid files (also from another process, e.g.
``aisemble infra down --cluster``); ``cluster_status`` reports. For fault tests a handle's nodes can be
SIGKILLed (``node.kill()``) and started again on the same data dir (``node.start()``), and
``handle.wait_in_sync(topic)`` waits until every partition of a topic has its full ISR again.

Layout: node ``i`` (1..n) listens on ``base_port + 2(i-1)`` (PLAINTEXT, clients) and the port after it
(CONTROLLER); its state lives in ``<data_dir>/node-<i>/`` exactly as a single broker's does in
:mod:`infra.kafka` (server.properties, kraft/, logs/server.log, kafka.out, kafka.pid).
``<data_dir>/aisemble-cluster.json`` records the cluster id, base port and node count.

Guarantees: every listener binds 127.0.0.1; every node is a voter of one static controller quorum
(``controller.quorum.voters``) and all storages are formatted once, with the same cluster id;
``default.replication.factor`` and the internal topics' replication factor are 3 with
``min.insync.replicas`` 2, so one node may die without a write with ``acks=all`` failing;
``auto.create.topics.enable=false``; a start that fails stops every JVM it started and raises
:class:`StartFailed` with the log tails.

What can go wrong: everything :mod:`infra.kafka` lists (Java or Maven missing, ports taken, a node that
exits or does not answer in time); a data dir formatted for another base port or node count
(:class:`InfraError`: use another data dir); a node whose JVM from this data dir still runs
(:class:`InfraError`, retriable). With two nodes down the controller quorum and ``min.insync.replicas``
are both lost: writes fail until a node returns.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from infra.errors import InfraError
from infra.kafka import (
    MAIN_CLASS,
    PID_FILE,
    STOP_TIMEOUT_S,
    broker_config,
    broker_ids,
    format_storage,
    java_command,
    kafka_answers,
    render_properties,
)
from infra.kafka_jars import fetch_jars, find_java, resolve_version
from infra.process import (
    cache_root,
    claim_pid_file,
    owned_pid,
    port_free,
    require_port_free,
    run_coroutine,
    spawn_detached,
    stop_by_pid_file,
    stop_started,
    stopped_on_failure,
    tail,
    tcp_open,
    wait_until_ready,
)

log = logging.getLogger(__name__)

DEFAULT_BASE_PORT = 19092
CLUSTER_FILE = "aisemble-cluster.json"
START_TIMEOUT_S = 120.0
REPLICATION_FACTOR = 3
MIN_INSYNC_REPLICAS = 2

__all__ = [
    "DEFAULT_BASE_PORT",
    "ClusterHandle",
    "ClusterNode",
    "cluster_bootstrap",
    "cluster_config",
    "cluster_status",
    "default_cluster_dir",
    "free_base_port",
    "start_cluster",
    "stop_cluster",
]


def default_cluster_dir(base_port: int, cache_dir: str | Path | None = None) -> Path:
    """Where a cluster on ``base_port`` keeps its state unless told otherwise: ``<cache>/run/kafka-cluster-<port>``."""
    return cache_root(cache_dir) / "run" / f"kafka-cluster-{base_port}"


def _ports(base_port: int, node_id: int) -> tuple[int, int]:
    port = base_port + 2 * (node_id - 1)
    return port, port + 1


def cluster_bootstrap(base_port: int, nodes: int = 3) -> str:
    """The bootstrap list naming every node of a cluster on ``base_port`` (pure)."""
    return ",".join(f"127.0.0.1:{_ports(base_port, i)[0]}" for i in range(1, nodes + 1))


def free_base_port(nodes: int = 3, attempts: int = 50) -> int:
    """A base port whose ``2 * nodes`` consecutive ports are all free now (random in 20000..59999)."""
    for _ in range(attempts):
        base = random.randrange(20000, 60000 - 2 * nodes)
        if all(port_free(base + offset) for offset in range(2 * nodes)):
            return base
    raise InfraError(f"no run of {2 * nodes} free ports found in {attempts} tries", retriable=True)


def cluster_config(
    node_id: int, base_port: int, nodes: int, log_dir: Path, extra: dict[str, str] | None = None
) -> dict[str, str]:
    """server.properties of node ``node_id`` of an ``nodes``-node combined-role cluster on 127.0.0.1 (pure)."""
    port, controller_port = _ports(base_port, node_id)
    voters = ",".join(f"{i}@127.0.0.1:{_ports(base_port, i)[1]}" for i in range(1, nodes + 1))
    rf, min_isr = str(REPLICATION_FACTOR), str(MIN_INSYNC_REPLICAS)
    config = broker_config(
        port,
        controller_port,
        log_dir,
        {
            "node.id": str(node_id),
            "controller.quorum.voters": voters,
            "default.replication.factor": rf,
            "min.insync.replicas": min_isr,
            "auto.create.topics.enable": "false",
            "offsets.topic.replication.factor": rf,
            "transaction.state.log.replication.factor": rf,
            "transaction.state.log.min.isr": min_isr,
            "share.coordinator.state.topic.replication.factor": rf,
            "share.coordinator.state.topic.min.isr": min_isr,
            "group.initial.rebalance.delay.ms": "0",
        },
    )
    del config["controller.quorum.bootstrap.servers"]  # a static quorum names its voters instead
    config.update(extra or {})
    return config


@dataclass
class ClusterNode:
    """One broker+controller JVM of a cluster. ``start`` (again), ``kill`` (SIGKILL) and ``stop`` (SIGTERM)."""

    node_id: int
    port: int
    controller_port: int
    data_dir: Path
    cluster_bootstrap: str
    _command: list[str] = field(repr=False)
    _popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The JVM's pid while it runs, else None."""
        return self._popen.pid if self._popen is not None and self._popen.poll() is None else None

    @property
    def pid_file(self) -> Path:
        return self.data_dir / PID_FILE

    @property
    def log_file(self) -> Path:
        return self.data_dir / "logs" / "server.log"

    def log_tail(self, lines: int = 30) -> str:
        parts = [tail(self.log_file, lines), tail(self.data_dir / "kafka.out", 10)]
        return "\n".join(p for p in parts if p)

    def spawn(self) -> None:
        """Start the JVM (not waiting for it); refuses when this node's JVM runs or its ports are taken."""
        if self.pid is not None:
            raise InfraError(f"node {self.node_id} already runs (pid {self.pid})")
        claim_pid_file(
            self.pid_file,
            MAIN_CLASS,
            lambda running: InfraError(f"node {self.node_id} from {self.data_dir} already runs (pid {running})"),
        )
        require_port_free(self.port, f"Kafka node {self.node_id}")
        require_port_free(self.controller_port, f"Kafka controller {self.node_id}")
        self._popen = spawn_detached(
            self._command, cwd=self.data_dir, out_path=self.data_dir / "kafka.out", pid_file=self.pid_file
        )
        log.info("started Kafka node %d at %s (pid %d)", self.node_id, self.bootstrap, self._popen.pid)

    def registered(self, within_s: float) -> bool:
        """True when this node answers and the cluster reports it as a live broker."""
        if not tcp_open("127.0.0.1", self.port, timeout=min(0.5, within_s)):
            return False
        try:
            return self.node_id in run_coroutine(lambda: broker_ids(self.bootstrap, within_s))
        except (KafkaError, OSError, TimeoutError, asyncio.CancelledError) as exc:
            log.debug("node %d not registered yet: %r", self.node_id, exc)
            return False

    def wait_ready(self, timeout: float = START_TIMEOUT_S, since: float | None = None) -> None:
        """Return once this node is a live broker of the cluster; :class:`StartFailed` with its log otherwise."""
        popen = self._popen
        if popen is None:
            raise InfraError(f"node {self.node_id} was not started by this handle")
        wait_until_ready(
            popen,
            lambda remaining: self.registered(max(0.5, min(5.0, remaining))),
            timeout=timeout,
            interval=0.25,
            exited=lambda status: f"Kafka node {self.node_id} exited with status {status} while starting",
            timed_out=f"Kafka node {self.node_id} did not join the cluster at {self.bootstrap} within {timeout:g} s",
            log_tail=self.log_tail,
            since=since,
        )

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start this node again on its data dir and wait until the cluster reports it live."""
        started = time.monotonic()
        self.spawn()
        with stopped_on_failure(lambda: self.stop(timeout=10.0)):
            self.wait_ready(timeout, since=started)
        log.info("Kafka node %d rejoined after %.1f s", self.node_id, time.monotonic() - started)

    def kill(self) -> None:
        """SIGKILL the JVM (no controlled shutdown, nothing flushed) and reap it."""
        popen = self._popen
        if popen is None or popen.poll() is not None:
            return
        log.warning("SIGKILL Kafka node %d (pid %d)", self.node_id, popen.pid)
        os.kill(popen.pid, signal.SIGKILL)
        popen.wait(timeout=30)
        self.pid_file.unlink(missing_ok=True)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM, wait up to ``timeout`` s, SIGKILL; idempotent."""
        if self._popen is None:
            return
        label = f"Kafka node {self.node_id} at {self.bootstrap}"
        stop_started(self._popen, self._popen.pid, self.pid_file, MAIN_CLASS, timeout=timeout, logger=log, label=label)


async def _describe_topic(bootstrap: str, topic: str, within_s: float) -> list[dict[str, Any]]:
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=max(1, int(within_s * 1000)), client_id="aisemble-infra"
    )
    try:
        async with asyncio.timeout(within_s):
            await admin.start()
            (described,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    if described["error_code"] != 0:
        raise InfraError(f"topic {topic!r}: metadata error code {described['error_code']}", retriable=True)
    return sorted(described["partitions"], key=lambda p: int(p["partition"]))


@dataclass
class ClusterHandle:
    """A cluster this process started: ``bootstrap`` names every node; ``stop()`` stops them all."""

    bootstrap: str
    cluster_id: str
    data_dir: Path
    nodes: list[ClusterNode]

    def node(self, node_id: int) -> ClusterNode:
        return next(n for n in self.nodes if n.node_id == node_id)

    def _live_bootstrap(self) -> str:
        live = [n.bootstrap for n in self.nodes if n.pid is not None]
        return ",".join(live) or self.bootstrap

    def partitions(self, topic: str, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Metadata of every partition of ``topic``: ``partition``, ``leader``, ``replicas``, ``isr`` ...

        Retried until ``timeout``: while a killed node is still in the metadata, a request may go to it.
        """
        deadline = time.monotonic() + timeout
        while True:
            within = max(1.0, deadline - time.monotonic())
            try:
                return run_coroutine(functools.partial(_describe_topic, self._live_bootstrap(), topic, within))
            except (KafkaError, OSError, TimeoutError) as exc:
                if time.monotonic() + 0.2 >= deadline:
                    message = f"no metadata for {topic!r} within {timeout:g} s: {exc!r}"
                    raise InfraError(message, retriable=True) from exc
                log.debug("describe %s failed, retrying: %r", topic, exc)
                time.sleep(0.2)

    def leader_of(self, topic: str, partition: int, timeout: float = 10.0) -> int:
        """The node id that leads ``topic``'s ``partition`` now (-1 while it has none)."""
        for p in self.partitions(topic, timeout):
            if int(p["partition"]) == partition:
                return int(p["leader"])
        raise InfraError(f"topic {topic!r} has no partition {partition}")

    def wait_in_sync(self, topic: str, timeout: float = 60.0, replicas: int = REPLICATION_FACTOR) -> float:
        """Wait until every partition of ``topic`` has ``replicas`` in-sync replicas and a leader; return the
        seconds it took. Raises :class:`InfraError` naming the last ISRs seen when ``timeout`` passes first."""
        started = time.monotonic()
        last: object = None
        while True:
            try:
                parts = self.partitions(topic, timeout=5.0)
                last = {int(p["partition"]): list(p["isr"]) for p in parts}
                if parts and all(len(p["isr"]) >= replicas and int(p["leader"]) >= 0 for p in parts):
                    return time.monotonic() - started
            except InfraError as exc:
                last = repr(exc)
            if time.monotonic() - started > timeout:
                raise InfraError(f"{topic!r} not fully in sync after {timeout:g} s; last ISRs: {last}", retriable=True)
            time.sleep(0.5)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM every running node at once (so the quorum stays for their controlled shutdowns), wait,
        SIGKILL stragglers. Idempotent."""
        running = [n for n in self.nodes if n._popen is not None and n._popen.poll() is None]
        for n in running:
            assert n._popen is not None
            log.info("stopping Kafka node %d (pid %d)", n.node_id, n._popen.pid)
            os.kill(n._popen.pid, signal.SIGTERM)
        for n in self.nodes:
            n.stop(timeout=timeout)  # waits for the SIGTERM above, SIGKILLs after timeout, removes pid files


def _read_cluster_file(data_dir: Path) -> dict[str, Any]:
    try:
        state = json.loads((data_dir / CLUSTER_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def start_cluster(
    base_port: int = DEFAULT_BASE_PORT,
    data_dir: str | Path | None = None,
    nodes: int = 3,
    heap: str = "384m",
    *,
    version: str | None = None,
    cache_dir: str | Path | None = None,
    timeout: float = START_TIMEOUT_S,
    extra_config: dict[str, str] | None = None,
) -> ClusterHandle:
    """Start ``nodes`` combined broker+controller nodes on ``127.0.0.1:base_port..`` and return once every
    node is a live broker of the cluster.

    Args:
        base_port: node ``i``'s client port is ``base_port + 2(i-1)``, its controller port the next one.
        data_dir: ``node-<i>/`` folders and the cluster file; default ``<cache>/run/kafka-cluster-<base_port>``.
            Reused across starts (same cluster id); pass a fresh temporary folder for an empty cluster.
        nodes: 3 or more (every one is a controller; an odd number keeps a majority after one loss).
        heap: each JVM's ``-Xmx``/``-Xms``.
        version, cache_dir: as for :func:`infra.kafka.start_kafka`.
        timeout: seconds for all nodes to join.
        extra_config: server.properties entries for every node (override the defaults).

    Raises:
        ToolMissing, PortInUse, StartFailed, InfraError: see the module docstring.
    """
    if nodes < REPLICATION_FACTOR:
        raise InfraError(f"a cluster needs at least {REPLICATION_FACTOR} nodes for replication factor 3")
    data = Path(data_dir) if data_dir is not None else default_cluster_dir(base_port, cache_dir)
    data.mkdir(parents=True, exist_ok=True)
    state = _read_cluster_file(data)
    if state and (state.get("base_port") != base_port or state.get("nodes") != nodes):
        raise InfraError(
            f"{data} holds a cluster of {state.get('nodes')} nodes on base port {state.get('base_port')}, "
            f"not {nodes} on {base_port}: use those, or another data dir"
        )
    cluster_id = str(state.get("cluster_id") or "") or None
    java = find_java()
    libs = fetch_jars(version, cache_dir)
    bootstrap = cluster_bootstrap(base_port, nodes)
    members: list[ClusterNode] = []
    for node_id in range(1, nodes + 1):
        port, controller_port = _ports(base_port, node_id)
        node_dir = data / f"node-{node_id}"
        node_dir.mkdir(exist_ok=True)
        props = node_dir / "server.properties"
        kraft = node_dir / "kraft"
        props.write_text(render_properties(cluster_config(node_id, base_port, nodes, kraft, extra_config)))
        if not (kraft / "meta.properties").is_file():
            cluster_id = format_storage(java, libs, node_dir, props, controller_port, cluster_id=cluster_id, flags=())
        command = java_command(java, libs, heap, node_dir, [MAIN_CLASS, str(props)])
        members.append(ClusterNode(node_id, port, controller_port, node_dir, bootstrap, command))
    assert cluster_id is not None
    (data / CLUSTER_FILE).write_text(
        json.dumps({"cluster_id": cluster_id, "base_port": base_port, "nodes": nodes}, indent=1) + "\n"
    )
    handle = ClusterHandle(bootstrap=bootstrap, cluster_id=cluster_id, data_dir=data, nodes=members)
    log.info("starting a %d-node Kafka %s cluster at %s (data %s)", nodes, resolve_version(version), bootstrap, data)
    started = time.monotonic()
    with stopped_on_failure(lambda: handle.stop(timeout=10.0)):
        for member in members:  # all first: none can register before a quorum of controllers runs
            member.spawn()
        for member in members:
            member.wait_ready(timeout, since=started)
    log.info("Kafka cluster answers at %s after %.1f s", bootstrap, time.monotonic() - started)
    return handle


def stop_cluster(
    data_dir: str | Path | None = None,
    base_port: int = DEFAULT_BASE_PORT,
    timeout: float = STOP_TIMEOUT_S,
    cache_dir: str | Path | None = None,
) -> list[int]:
    """Stop the nodes whose pid files are in ``<data_dir>/node-*/`` (from any process), all at once.
    ``data_dir`` defaults to the default one for ``base_port``. Returns the ids of the nodes that were running."""
    data = Path(data_dir) if data_dir is not None else default_cluster_dir(base_port, cache_dir)
    pids: dict[int, int] = {}
    for node_dir in sorted(data.glob("node-*")):
        pid = owned_pid(node_dir / PID_FILE, MAIN_CLASS)
        if pid is not None:
            pids[int(node_dir.name.split("-", 1)[1])] = pid
            os.kill(pid, signal.SIGTERM)  # all at once, so the quorum lasts through the controlled shutdowns
    for node_id in pids:
        stop_by_pid_file(data / f"node-{node_id}" / PID_FILE, MAIN_CLASS, timeout=timeout)
    return sorted(pids)


def cluster_status(
    base_port: int = DEFAULT_BASE_PORT, data_dir: str | Path | None = None, cache_dir: str | Path | None = None
) -> dict[str, Any]:
    """``{"bootstrap", "answers", "brokers", "nodes": {id: pid or None}, "data_dir"}`` of a local cluster."""
    data = Path(data_dir) if data_dir is not None else default_cluster_dir(base_port, cache_dir)
    nodes = int(_read_cluster_file(data).get("nodes") or 3)
    bootstrap = cluster_bootstrap(base_port, nodes)
    answers = kafka_answers(bootstrap)
    brokers: list[int] = []
    if answers:
        try:
            brokers = run_coroutine(lambda: broker_ids(bootstrap, 3.0))
        except (KafkaError, OSError, TimeoutError) as exc:
            log.debug("no broker list from %s: %r", bootstrap, exc)
    return {
        "bootstrap": bootstrap,
        "answers": answers,
        "brokers": brokers,
        "nodes": {i: owned_pid(data / f"node-{i}" / PID_FILE, MAIN_CLASS) for i in range(1, nodes + 1)},
        "data_dir": str(data),
    }
