"""The pipeline as processes: ``aisemble edge`` and one ``aisemble agent <service>`` per service.

Used by ``aisemble run``, the tests and the benchmarks, so all three run exactly what production runs.
``Pipeline.isolated`` gives a unique topic prefix, consumer groups, edge id and port, so concurrent test
modules and benchmarks never see each other's events. ``start`` returns once ``/health`` says 200 (every
agent has loaded its model and sent a heartbeat); processes are stopped by PID (SIGTERM, then SIGKILL).
``spawn_agents``, ``spawn_edge`` and ``wait_healthy`` are its three steps, for ``aisemble run``, which starts the
agents while it checks (or starts) Kafka and Redis and the edge once they answer.

Agent metrics: when ``AISEMBLE_AGENT_METRICS_PORT`` is set (in the environment or the ``env`` given), each
agent process gets its own port, kept across restarts and listed in ``metrics_ports``: the setting's port
for the first agent, the next port for the next one, and so on; ``0`` gives each a free port.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

from streams.settings import Settings

log = logging.getLogger(__name__)

HEALTH_POLL_S = 0.1  # how often ``wait_healthy`` asks /health (one small local request each time)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


TEST_SESSION_ENV = "AISEMBLE_TEST_SESSION"


def throwaway_prefix(length: int = 10) -> str:
    """A fresh topic prefix for a test or a benchmark: ``t``, the test session's tag (``AISEMBLE_TEST_SESSION``,
    hex digits; ``tests/conftest.py`` sets it, and deletes at the end the topics of its own tag only), then
    random hex digits up to ``length``."""
    tag = os.environ.get(TEST_SESSION_ENV, "")
    return f"t{tag}{uuid.uuid4().hex[: max(4, length - len(tag))]}"


class Pipeline:
    """An edge and a set of agents for one test module."""

    def __init__(self, settings: Settings, services: list[str], log_dir: Path | None = None, **env: str) -> None:
        """Processes for ``services`` plus an edge, configured by ``settings`` and extra ``AISEMBLE_*`` env.

        With ``log_dir`` each process logs to ``<log_dir>/<prefix>-<name>.log``; without, to this terminal.
        """
        self.settings = settings
        self.prefix = settings.topic_prefix
        self.port = settings.edge_port
        self.services = services
        self.log_dir = log_dir
        self.env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "AISEMBLE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "AISEMBLE_REDIS_URL": settings.redis_url,
            "AISEMBLE_TOPIC_PREFIX": settings.topic_prefix,
            "AISEMBLE_EDGE_ID": settings.edge_id,
            "AISEMBLE_EDGE_PORT": str(settings.edge_port),
            "AISEMBLE_SERVICES": json.dumps(services),
            "AISEMBLE_PARTITIONS": str(settings.partitions),
            "AISEMBLE_REPLICATION_FACTOR": str(settings.replication_factor),
            **env,
        }
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.args: dict[str, list[str]] = {}
        self.proc_env: dict[str, dict[str, str]] = {}
        self.metrics_ports: dict[str, int] = {}  # agent process name -> its metrics port
        port = self.env.get("AISEMBLE_AGENT_METRICS_PORT", "").strip()
        self._metrics_base = int(port) if port.isdigit() else settings.agent_metrics_port
        self.url = f"http://127.0.0.1:{self.port}"

    @classmethod
    def isolated(cls, base: Settings, services: list[str], log_dir: Path | None = None, **env: str) -> Pipeline:
        """A pipeline on a fresh topic prefix and a free port, sharing ``base``'s Kafka and Redis."""
        prefix = throwaway_prefix()
        settings = base.model_copy(
            update={"topic_prefix": prefix, "edge_id": f"{prefix}-edge", "edge_port": free_port()}
        )
        return cls(
            settings,
            services,
            log_dir,
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            AISEMBLE_HEARTBEAT_INTERVAL_S="1",
            **env,
        )

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        out = None
        if self.log_dir is not None:
            out = (self.log_dir / f"{self.prefix}-{name}.log").open("ab")
        self.args[name] = args
        if env is not None:
            self.proc_env[name] = env
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "aisemble", *args],
            env={**self.env, **self.proc_env.get(name, {})},
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def _agent_env(self, name: str) -> dict[str, str]:
        """The metrics port of a new agent process (see the module docstring); none when metrics are off."""
        if self._metrics_base is None:
            return {}
        port = free_port() if self._metrics_base == 0 else self._metrics_base + len(self.metrics_ports)
        self.metrics_ports[name] = port
        return {"AISEMBLE_AGENT_METRICS_PORT": str(port)}

    def add_agent(self, service: str, *extra: str) -> str:
        """Start one more agent process for ``service`` (joins the same consumer group); returns its name.

        ``extra`` arguments go to ``aisemble agent`` (e.g. ``--runner module:function``)."""
        name = f"{service}-{sum(1 for n in self.procs if n.startswith(service))}"
        self._spawn(name, ["agent", service, *extra], self._agent_env(name))
        return name

    def restart(self, name: str) -> None:
        """Start process ``name`` again with the arguments it was started with (it must have exited)."""
        if self.procs[name].poll() is None:
            raise RuntimeError(f"{name} is still running")
        self._spawn(name, self.args[name])

    def exited(self) -> dict[str, int]:
        """Processes that have exited, with their exit codes."""
        return {name: code for name, proc in self.procs.items() if (code := proc.poll()) is not None}

    def spawn_agents(self) -> None:
        """Start one agent process per service (each waits for the broker: ``agents.worker.BROKER_WAIT_S``)."""
        for service in self.services:
            self._spawn(service, ["agent", service], self._agent_env(service))

    def spawn_edge(self) -> None:
        """Start the edge process (Kafka must answer: its start-up creates topics)."""
        self._spawn("edge", ["edge"])

    def start(self, timeout_s: float = 300.0) -> Pipeline:
        """Spawn the agents and the edge; return once ``/health`` says 200 (see ``wait_healthy``)."""
        self.spawn_agents()
        self.spawn_edge()
        return self.wait_healthy(timeout_s)

    def wait_healthy(self, timeout_s: float = 300.0, poll_s: float = HEALTH_POLL_S) -> Pipeline:
        """Return once ``/health`` answers 200, asking every ``poll_s``; a process that exits first, or no 200
        within ``timeout_s``, stops every process and raises (``RuntimeError`` with its log tail, ``TimeoutError``).
        """
        deadline = time.monotonic() + timeout_s
        last = ""
        with httpx.Client(timeout=5) as client:
            while time.monotonic() < deadline:
                for name, proc in self.procs.items():
                    if proc.poll() is not None:
                        self.stop()
                        raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")
                try:
                    response = client.get(f"{self.url}/health")
                    last = response.text
                    if response.status_code == 200:
                        return self
                except httpx.HTTPError as exc:
                    last = repr(exc)
                time.sleep(poll_s)
        self.stop()
        raise TimeoutError(f"pipeline not healthy after {timeout_s}s: {last}")

    def log_tail(self, name: str, chars: int = 4000) -> str:
        if self.log_dir is None:
            return ""
        path = self.log_dir / f"{self.prefix}-{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        self.procs[name].send_signal(sig)
        self.procs[name].wait(timeout=30)

    def drop_topics(self) -> int:
        """Delete this pipeline's topics (those of its prefix; call after ``stop``, for throw-away prefixes of
        tests and benchmarks); how many were deleted. Best effort: a broker that refuses is logged."""
        from streams.topics import drop_topics, list_topics, prefix_topics

        async def drop() -> int:
            return await drop_topics(self.settings, prefix_topics(await list_topics(self.settings), self.prefix))

        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:  # callable inside an event loop too
            try:
                return pool.submit(lambda: asyncio.run(drop())).result(timeout=60)
            except Exception as exc:  # noqa: BLE001  (policy: cleanup never hides a run's result)
                log.warning("could not drop the topics of %s: %r", self.prefix, exc)
                return 0

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
