"""A local Redis for the result cache and claim checks: check one, or start one on 127.0.0.1.

``ensure_redis(url)`` starts nothing when a Redis already answers PING at ``url``; otherwise it starts
``redis-server`` (installing Debian's ``redis-server`` package first when it is missing and we are root
on Debian: :func:`infra.apt.apt_install`) bound to 127.0.0.1 on the URL's port, with persistence off.
``stop_redis(data_dir)`` stops it through its pid file from any process; ``redis_status`` reports.

A data dir (default ``<cache_dir>/run/redis-<port>``) holds ``redis.pid`` while it runs and
``redis.log`` (the server's own output); it is Redis's working dir, though nothing is saved there.

Guarantees: the server binds 127.0.0.1 only, saves nothing (``--save "" --appendonly no``), and a
returned handle's server has answered PING; a start that fails stops what it started and raises
:class:`StartFailed` with the tail of ``redis.log``.

What can go wrong: ``redis-server`` missing and not installable (:class:`ToolMissing`), the port taken
by something that is not Redis (:class:`PortInUse`), a Redis started from the same data dir that still
runs but does not answer (:class:`InfraError`, retriable: it is not started twice), a server that exits
or does not answer in time (:class:`StartFailed`), a non-local or TLS URL (:class:`NotLoopback` /
``ValueError``).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis as redis_client
from redis.exceptions import RedisError

from infra.addresses import local_redis_port, parse_redis_url
from infra.apt import apt_install
from infra.errors import InfraError, ToolMissing
from infra.process import (
    cache_root,
    claim_pid_file,
    dir_lock,
    owned_pid,
    require_port_free,
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

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
PID_FILE = "redis.pid"
MARKER = "redis-server"
INSTALL_HINT = "apt-get install redis-server (Debian/Ubuntu), brew install redis (macOS), or use docker compose"

__all__ = [
    "RedisHandle",
    "default_data_dir",
    "ensure_redis",
    "redis_answers",
    "redis_server_command",
    "redis_status",
    "start_redis",
    "stop_redis",
]


def default_data_dir(port: int, cache_dir: str | Path | None = None) -> Path:
    """Where a Redis on ``port`` keeps its pid file and log: ``<cache_dir>/run/redis-<port>``."""
    return cache_root(cache_dir) / "run" / f"redis-{port}"


def redis_answers(url: str, timeout: float = 2.0) -> bool:
    """True when a Redis at ``url`` answers PING within ``timeout`` seconds."""
    try:
        client = redis_client.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    except ValueError:
        return False
    try:
        return bool(client.ping())
    except (RedisError, OSError):
        return False
    finally:
        client.close()


def redis_server_command(server: str, port: int, data_dir: Path) -> list[str]:
    """The ``redis-server`` command line: loopback only, no persistence, in the foreground (pure)."""
    return [
        server, "--bind", "127.0.0.1", "--port", str(port), "--protected-mode", "yes",
        "--save", "", "--appendonly", "no", "--daemonize", "no", "--dir", str(data_dir), "--logfile", "",
    ]  # fmt: skip


def find_redis_server(install: bool = True) -> str:
    """Path of ``redis-server``; installs Debian's package when missing, ``install`` and root on Debian.

    Raises:
        ToolMissing: not installed and not installable here.
    """
    server = shutil.which("redis-server")
    if server is not None:
        return server
    if not install:
        raise ToolMissing("redis-server", INSTALL_HINT)
    apt_install("redis-server", ["redis-server"], INSTALL_HINT)
    server = shutil.which("redis-server")
    if server is None:
        raise ToolMissing("redis-server", f"installed, yet not on PATH; {INSTALL_HINT}")
    return server


@dataclass
class RedisHandle:
    """A Redis this process started; ``stop()`` stops it (idempotent)."""

    url: str
    pid: int
    data_dir: Path
    log_file: Path
    _popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def pid_file(self) -> Path:
        return self.data_dir / PID_FILE

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM, wait up to ``timeout`` s, SIGKILL; remove the pid file."""
        stop_started(
            self._popen, self.pid, self.pid_file, MARKER, timeout=timeout, logger=log, label=f"Redis at {self.url}"
        )


def start_redis(
    port: int = 6379,
    data_dir: str | Path | None = None,
    *,
    db: int = 0,
    cache_dir: str | Path | None = None,
    timeout: float = START_TIMEOUT_S,
    install: bool = True,
) -> RedisHandle:
    """Start ``redis-server`` on ``127.0.0.1:port`` and return once it answers PING.

    Raises:
        ToolMissing, PortInUse, StartFailed, InfraError: see the module docstring.
    """
    data = Path(data_dir) if data_dir is not None else default_data_dir(port, cache_dir)
    data.mkdir(parents=True, exist_ok=True)
    url = f"redis://127.0.0.1:{port}/{db}"
    pid_file = data / PID_FILE
    claim_pid_file(
        pid_file,
        MARKER,
        lambda running: InfraError(
            f"a Redis from {data} already runs (pid {running}) and does not answer at {url}: "
            f"stop it (aisemble infra down)",
            retriable=True,
        ),
    )
    require_port_free(port, "Redis")
    server = find_redis_server(install)
    log_file = data / "redis.log"
    log.info("starting Redis at %s (dir %s)", url, data)
    started = time.monotonic()
    popen = spawn_detached(redis_server_command(server, port, data), cwd=data, out_path=log_file, pid_file=pid_file)
    handle = RedisHandle(url=url, pid=popen.pid, data_dir=data, log_file=log_file, _popen=popen)
    with stopped_on_failure(lambda: handle.stop(timeout=5.0)):
        wait_until_ready(
            popen,
            lambda _remaining: tcp_open("127.0.0.1", port, 0.5) and redis_answers(url, timeout=1.0),
            timeout=timeout,
            interval=0.05,
            exited=lambda status: f"redis-server exited with status {status}",
            timed_out=f"Redis did not answer at {url} within {timeout:g} s",
            log_tail=lambda: tail(log_file),
            since=started,
        )
    log.info("Redis answers at %s after %.2f s (pid %d)", url, time.monotonic() - started, popen.pid)
    return handle


def ensure_redis(
    url: str,
    *,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    timeout: float = START_TIMEOUT_S,
    install: bool = True,
) -> RedisHandle | None:
    """A Redis at ``url``: None when one already answers there, else the handle of a started one.

    Raises:
        NotLoopback: nothing answers and the URL's host is not 127.0.0.1/localhost.
        ValueError: a malformed or ``rediss://`` URL.
        ToolMissing, PortInUse, StartFailed, InfraError: from ``start_redis``.
    """
    if redis_answers(url):
        log.info("Redis already answers at %s; starting none", url)
        return None
    port = local_redis_port(url)
    if shutil.which("redis-server") is None:
        find_redis_server(install)
        if redis_answers(url):  # the Debian package may have started its own service on 6379
            log.info("Redis answers at %s after installing it; starting none", url)
            return None
    data = Path(data_dir) if data_dir is not None else default_data_dir(port, cache_dir)
    with dir_lock(data):  # a second process ensuring the same Redis waits here, then finds it
        if redis_answers(url):
            log.info("Redis answers at %s (started by another process); starting none", url)
            return None
        return start_redis(port, data, db=parse_redis_url(url)[2], timeout=timeout, install=install)


def stop_redis(data_dir: str | Path, timeout: float = STOP_TIMEOUT_S) -> bool:
    """Stop the Redis whose pid file is in ``data_dir`` (from any process). True when one was running."""
    return stop_by_pid_file(Path(data_dir) / PID_FILE, MARKER, timeout=timeout)


def redis_status(
    url: str, data_dir: str | Path | None = None, cache_dir: str | Path | None = None
) -> dict[str, str | int | bool | None]:
    """``{"url", "answers", "pid", "data_dir"}``; pid is that of a Redis infra started."""
    data = status_data_dir(data_dir, lambda: default_data_dir(local_redis_port(url), cache_dir))
    return {
        "url": url,
        "answers": redis_answers(url),
        "pid": owned_pid(data / PID_FILE, MARKER) if data is not None else None,
        "data_dir": str(data) if data is not None else None,
    }
