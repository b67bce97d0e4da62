"""``aisemble run`` supervises: an agent that dies is restarted with backoff and the rest keeps serving."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from aisemble.pipeline import free_port, throwaway_prefix
from aisemble.supervisor import RestartPolicy
from streams.settings import Settings


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_restart_delay_doubles_per_failure_and_resets_after_a_stable_run() -> None:
    clock = Clock()
    policy = RestartPolicy(initial_s=1, max_s=8, stable_s=60, clock=clock)
    policy.started("a")
    assert [policy.exited("a") for _ in range(5)] == [1, 2, 4, 8, 8]
    policy.started("a")
    clock.now += 61  # ran long enough to count as healthy again
    assert policy.exited("a") == 1


def test_a_restart_is_due_only_after_its_delay() -> None:
    clock = Clock()
    policy = RestartPolicy(initial_s=2, clock=clock)
    policy.started("a")
    policy.exited("a")
    assert policy.due() == [] and policy.waiting("a")
    clock.now += 2
    assert policy.due() == ["a"]
    policy.started("a")
    assert policy.due() == [] and not policy.waiting("a")


def _health(url: str) -> dict[str, object]:
    try:
        body: dict[str, object] = httpx.get(f"{url}/health", timeout=3).json()
        return body
    except (httpx.HTTPError, ValueError):
        return {}


def _agent_pids(health: dict[str, object]) -> list[int]:
    services = health.get("services")
    if not isinstance(services, dict):
        return []
    agents = services.get("data", {}).get("agents", [])
    return [a["pid"] for a in agents if isinstance(a, dict) and a.get("pid")]


@pytest.mark.integration
@pytest.mark.fault
def test_aisemble_run_restarts_a_killed_agent_and_ctrl_c_stops_all(infra_settings: Settings, tmp_path: Path) -> None:
    prefix = throwaway_prefix()
    port = free_port()
    env = {
        **os.environ,
        "AISEMBLE_KAFKA_BOOTSTRAP": infra_settings.kafka_bootstrap,
        "AISEMBLE_REDIS_URL": infra_settings.redis_url,
        "AISEMBLE_TOPIC_PREFIX": prefix,
        "AISEMBLE_EDGE_ID": f"{prefix}-edge",
        "AISEMBLE_EDGE_PORT": str(port),
        "AISEMBLE_HEARTBEAT_INTERVAL_S": "1",
        "AISEMBLE_HEARTBEAT_TTL_S": "3",
        "AISEMBLE_SERVICES": json.dumps(["data"]),
    }
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "run.log").open("wb")
    run = subprocess.Popen([sys.executable, "-m", "aisemble", "run"], env=env, stdout=log, stderr=subprocess.STDOUT)
    body = {"operation": "analyze", "data": {"records": [{"v": 1}]}, "cache": False}
    try:
        deadline = time.monotonic() + 120
        pids: list[int] = []
        while time.monotonic() < deadline and not pids:
            pids = _agent_pids(_health(url))
            time.sleep(0.5)
        assert pids, f"pipeline never healthy: {(tmp_path / 'run.log').read_text()[-3000:]}"
        os.kill(pids[0], signal.SIGKILL)
        killed_at = time.monotonic()

        new_pids: list[int] = []
        answered_after = None
        while time.monotonic() < killed_at + 120:
            new_pids = [p for p in _agent_pids(_health(url)) if p != pids[0]]
            if new_pids:
                response = httpx.post(f"{url}/data/process", json=body, timeout=10)
                if response.status_code == 200:
                    answered_after = time.monotonic() - killed_at
                    break
            time.sleep(0.5)
        counts = {"test": "supervisor_restart", "killed_pid": pids[0], "new_pid": new_pids[:1],
                  "served_again_after_s": answered_after}  # fmt: skip
        print("FAULT-COUNTS:", json.dumps(counts))
        assert new_pids, "the killed agent was not restarted"
        assert answered_after is not None
        assert run.poll() is None, "aisemble run must keep running when one agent dies"
    finally:
        run.send_signal(signal.SIGINT)
        status = run.wait(timeout=60)
        log.close()
    text = (tmp_path / "run.log").read_text()
    assert "exited with status" in text and "restarted data" in text
    assert status == 0
    for pid in [*pids, *new_pids]:  # every child stopped with it
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
