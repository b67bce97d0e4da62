"""Test harness: the real pipeline (edge + agents as subprocesses) on a unique topic prefix.

Each ``Pipeline`` runs ``aisemble edge`` and ``aisemble agent <service>`` exactly as production does,
against the real Kafka and Redis, with its own topic prefix, consumer groups, edge id and port, so tests
never see each other's events. Processes are stopped by PID (SIGTERM, then SIGKILL) on ``stop``.
"""

from __future__ import annotations

import json
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Pipeline:
    """An edge and a set of agents for one test module."""

    def __init__(self, base: Settings, services: list[str], log_dir: Path, **env: str) -> None:
        self.prefix = f"t{uuid.uuid4().hex[:10]}"
        self.port = free_port()
        self.services = services
        self.log_dir = log_dir
        self.env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "AISEMBLE_KAFKA_BOOTSTRAP": base.kafka_bootstrap,
            "AISEMBLE_REDIS_URL": base.redis_url,
            "AISEMBLE_TOPIC_PREFIX": self.prefix,
            "AISEMBLE_EDGE_ID": f"{self.prefix}-edge",
            "AISEMBLE_EDGE_PORT": str(self.port),
            "AISEMBLE_SERVICES": json.dumps(services),
            "AISEMBLE_HEARTBEAT_INTERVAL_S": "1",
            **env,
        }
        self.settings = Settings(
            kafka_bootstrap=base.kafka_bootstrap,
            redis_url=base.redis_url,
            topic_prefix=self.prefix,
            edge_id=f"{self.prefix}-edge",
            edge_port=self.port,
        )
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.url = f"http://127.0.0.1:{self.port}"

    def _spawn(self, name: str, args: list[str]) -> None:
        log = (self.log_dir / f"{self.prefix}-{name}.log").open("wb")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "aisemble", *args], env=self.env, stdout=log, stderr=subprocess.STDOUT
        )

    def start(self, timeout_s: float = 240.0) -> Pipeline:
        for service in self.services:
            self._spawn(service, ["agent", service])
        self._spawn("edge", ["edge"])
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")
            try:
                response = httpx.get(f"{self.url}/health", timeout=5)
                last = response.text
                if response.status_code == 200:
                    return self
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"pipeline not healthy after {timeout_s}s: {last}")

    def log_tail(self, name: str, chars: int = 4000) -> str:
        path = self.log_dir / f"{self.prefix}-{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        self.procs[name].send_signal(sig)
        self.procs[name].wait(timeout=30)

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
