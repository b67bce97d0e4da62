"""Process and port plumbing shared by the Kafka and Redis starters: pid files, ports, stopping, log tails.

Guarantees:
- A server is stopped with SIGTERM, waited for up to a deadline, then SIGKILLed; ``terminate`` returns
  only once the process is gone (or was never there).
- ``stop_by_pid_file`` only signals a pid whose command line (``/proc/<pid>/cmdline``, where there is a
  /proc) still contains the marker given, so a pid file left behind never kills a recycled pid.
- ``run_coroutine`` runs a short coroutine from synchronous code even when the calling thread already
  runs an event loop (it then uses a helper thread), so the sync API is safe in async test fixtures.

What can go wrong: permissions (signalling another user's process raises ``PermissionError``), and the
inherent race between checking that a port is free and the server binding it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

CACHE_DIR_ENV = "AISEMBLE_CACHE_DIR"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache root: ``cache_dir``, else ``$AISEMBLE_CACHE_DIR``, else ``~/.cache/aisemble``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "aisemble"


def tcp_open(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when a TCP connection to ``host:port`` is accepted within ``timeout`` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when ``host:port`` can be bound now (with SO_REUSEADDR, as the JVM and Redis bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel considers free right now (another process may still take it before you)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists (zombies of our own children count as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError, IndexError):
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def cmdline(pid: int) -> str | None:
    """The process's command line joined by spaces, or None when unknown (no /proc, or gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def read_pid(pid_file: Path) -> int | None:
    """The pid in ``pid_file``, or None when the file is missing or unreadable."""
    try:
        text = pid_file.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def write_pid(pid_file: Path, pid: int) -> None:
    """Write ``pid`` atomically (write a temp file, then rename)."""
    tmp = pid_file.with_suffix(pid_file.suffix + ".tmp")
    tmp.write_text(f"{pid}\n")
    tmp.replace(pid_file)


def terminate(pid: int, *, timeout: float = 30.0, popen: subprocess.Popen[bytes] | None = None) -> bool:
    """SIGTERM ``pid``, wait up to ``timeout`` s, then SIGKILL. True when it had to be killed.

    Pass ``popen`` when the process is our child, so that it is reaped (no zombie left).
    """
    if popen is not None and popen.poll() is not None:
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    if _wait_gone(pid, timeout, popen):
        return False
    log.warning("pid %d did not stop within %.0f s after SIGTERM; sending SIGKILL", pid, timeout)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    _wait_gone(pid, 10.0, popen)
    return True


def _wait_gone(pid: int, timeout: float, popen: subprocess.Popen[bytes] | None) -> bool:
    if popen is not None:
        try:
            popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.1)
    return not pid_alive(pid)


def stop_by_pid_file(pid_file: Path, marker: str, *, timeout: float = 30.0) -> bool:
    """Stop the process named by ``pid_file`` if it is alive and its command line contains ``marker``.

    Removes the pid file in every case where the process is gone afterwards. Returns True when a
    process was signalled.
    """
    pid = read_pid(pid_file)
    if pid is None or not pid_alive(pid):
        pid_file.unlink(missing_ok=True)
        return False
    line = cmdline(pid)
    if line is not None and marker not in line:
        log.warning("pid file %s names pid %d, which is not ours (%s); leaving it alone", pid_file, pid, line)
        pid_file.unlink(missing_ok=True)
        return False
    log.info("stopping pid %d (pid file %s)", pid, pid_file)
    terminate(pid, timeout=timeout)
    pid_file.unlink(missing_ok=True)
    return True


def owned_pid(pid_file: Path, marker: str) -> int | None:
    """The pid from ``pid_file`` when that process is alive and (where /proc tells) carries ``marker``."""
    pid = read_pid(pid_file)
    if pid is None or not pid_alive(pid):
        return None
    line = cmdline(pid)
    if line is not None and marker not in line:
        return None
    return pid


@contextlib.contextmanager
def dir_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` (a ``.lock`` file in it) so that two processes starting a
    server from the same data dir take turns; released when the block ends or the process dies."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a text file ("" when it does not exist)."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            data = fh.read()
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return ""
        return f"(cannot read {path}: {exc})"
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


def run_coroutine(factory: Callable[[], Coroutine[object, object, T]]) -> T:
    """Run ``factory()`` to completion from sync code, on a helper thread when a loop already runs here."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="infra-probe") as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()
